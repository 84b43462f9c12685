"""Training data from channel folders, validated row by row into TRL's conversational dataset types.

Files: `.jsonl` (one object per line), `.json` (an array of objects, or JSON Lines), `.csv` (a header
row; list-valued fields as JSON text), `.parquet`. Several files per channel, subfolders included.

SFT rows (all rows of a run must be of one kind: conversations, or plain text):

    {"instruction", "output"[, "input"]}     Alpaca; "input" is appended to the instruction
    {"prompt", "completion"}                 strings, or lists of messages
    {"messages": [...]}                      the last message must be the assistant's: it is the completion
    {"text"}                                 plain language modelling, loss on every token

Preference rows (DPO, ORPO, SimPO): {"prompt", "chosen", "rejected"} as strings or message lists, or
{"chosen", "rejected"} message lists sharing everything but the last message (implicit prompt). KTO takes
unpaired rows {"prompt", "completion", "label": true|false}, or preference rows (each one good, one bad).

Strings become one user and one assistant message, so every conversation goes through the model's
chat template in training exactly as `serve` applies it; the loss is on the completion only. A bad row
is an error naming file and line (or row); nothing is skipped silently. No torch here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from pathlib import Path
from typing import Iterator

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
SFT_FORMATS = '{"instruction", "output"}, {"prompt", "completion"}, {"messages"} or {"text"}'
PREFERENCE_FORMATS = '{"prompt", "chosen", "rejected"} or {"chosen", "rejected"} message lists'


class DataError(ValueError):
    """The training data is wrong; the message names the file and line."""


def load_sft_rows(channel_dir: Path) -> list[dict]:
    rows, kind = [], None
    for where, record in read_records(channel_dir):
        row = to_sft_row(record, where)
        row_kind = "text" if "text" in row else "conversation"
        if kind is not None and row_kind != kind:
            raise DataError(f"{where}: a {row_kind} row among {kind} rows: use one kind per job "
                            f"(plain text, or instruction/prompt-completion/messages rows)")
        kind = row_kind
        rows.append(row)
    return rows


def load_preference_rows(channel_dir: Path) -> list[dict]:
    return [to_preference_row(record, where) for where, record in read_records(channel_dir)]


def load_kto_rows(channel_dir: Path) -> list[dict]:
    """KTO's unpaired rows: {"prompt", "completion", "label": true|false}; a preference pair counts as two
    (its chosen answer good, its rejected answer bad)."""
    rows = []
    for where, record in read_records(channel_dir):
        if isinstance(record, dict) and "label" in record:
            rows.append(to_kto_row(record, where))
        else:
            pair = to_preference_row(record, where)
            rows += [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                     {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
    if rows and len({row["label"] for row in rows}) < 2:
        raise DataError(f"{channel_dir}: KTO needs both good (label true) and bad (label false) examples; all are "
                        f"{rows[0]['label']}")
    return rows


def to_kto_row(record: dict, where: str) -> dict:
    if not ("prompt" in record and "completion" in record):
        raise DataError(f"{where}: a KTO row needs 'prompt', 'completion' and 'label', got keys {sorted(record)}")
    if not isinstance(record["label"], bool):
        raise DataError(f"{where}: 'label' must be true (a good answer) or false (a bad one), got {record['label']!r}")
    completion = _turns(record, "completion", where, _assistant)
    _ends_with_assistant(completion, where, "completion")
    return {"prompt": _turns(record, "prompt", where, _user), "completion": completion, "label": record["label"]}


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `fraction` of the rows (at least one when the fraction is > 0 and rows allow)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    held_out = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    return shuffled[held_out:], shuffled[:held_out]


# --- files ---------------------------------------------------------------------------------------------
def write_jsonl(rows: list[dict], path: Path) -> None:
    """Rows the job makes (preference=auto's pairs, instructions=auto's rows), whole or not at all: a restart
    trusts what it finds."""
    partial = path.with_name(path.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    partial.replace(path)


def content_name(folder: Path) -> str:
    """A model folder named by its content (its config and its files' sizes), for what must stay the same across
    a restart: a model.tar.gz is extracted to a folder whose path changes when a restart downloads it again."""
    config = (folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b""
    sizes = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    return "folder:" + hashlib.sha256(config + json.dumps(sizes).encode()).hexdigest()[:16]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_records(channel_dir: Path) -> Iterator[tuple[str, object]]:
    files = sorted(p for p in channel_dir.rglob("*")  # not hidden, nor in .ipynb_checkpoints and the like
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(channel_dir).parts))
    data_files = [p for p in files if p.suffix.lower() in SUFFIXES]
    if not data_files:
        found = ", ".join(p.name for p in files[:5]) or "nothing"
        raise DataError(f"no data files ({', '.join(SUFFIXES)}) in {channel_dir} (found: {found})")
    for path in data_files:
        count = 0
        for where, record in _READERS[path.suffix.lower()](path):
            count += 1
            yield where, record
        if count == 0:
            raise DataError(f"{path}: the file has no examples")


def read_text(path: Path) -> str:
    """A data file's text: UTF-8, a byte-order mark (Excel's "CSV UTF-8", Notepad's) dropped. Anything else
    is a DataError naming the file and the line, not a decoder's traceback."""
    data = path.read_bytes()
    _refuse_gzip(path, data[:2])
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _not_utf8(f"{path}:{line}", data[e.start], f"byte offset {e.start}") from None


def _jsonl(path: Path) -> Iterator[tuple[str, object]]:
    """Read line by line (a file may be larger than the memory a copy of its text would take)."""
    with path.open("rb") as lines:  # split on b"\n" only: U+2028 and the like are JSON text
        _refuse_gzip(path, lines.read(2))
        lines.seek(0)
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(f"{path}:{number}", raw[e.start], f"column {e.start + 1}") from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            if line.strip():
                yield f"{path}:{number}", _json_line(line, f"{path}:{number}")


def _refuse_gzip(path: Path, head: bytes) -> None:
    if head == b"\x1f\x8b":
        raise DataError(f"{path}: gzip-compressed: decompress it (the channel's files are read as they are)")


def _not_utf8(where: str, byte: int, at: str) -> DataError:
    return DataError(f"{where}: not UTF-8 text (invalid byte 0x{byte:02x} at {at}): save it as UTF-8, or take it "
                     "out of the channel if it is not text")


def _json(path: Path) -> Iterator[tuple[str, object]]:
    text = read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json
            yield from _jsonl(path)
            return
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of examples (or JSON Lines), got {type(value).__name__}")
    for index, record in enumerate(value):
        yield f"{path}: item {index}", record


def _csv(path: Path) -> Iterator[tuple[str, object]]:
    """Rows of a CSV file under its header row, each named by the line it starts on (blank lines skipped).
    Strict: a quote never closed is an error, not the rest of the file swallowed into one cell; a cell may
    hold a whole article (no 128 KiB limit). A `label` cell that says true or false is KTO's boolean."""
    csv.field_size_limit(2**31 - 1)
    rows = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    header = None
    while True:
        starts = rows.line_num + 1
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{starts}: malformed CSV ({e}; a quote opened in this row may never close)") \
                from None
        if not row:
            continue  # a blank line
        if header is None:
            header = row
            continue
        if len(row) > len(header):
            raise DataError(f"{path}:{starts}: more fields than the header has columns")
        yield f"{path}:{starts}", {column: _csv_cell(column, value) for column, value in zip(header, row)}


def _parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for index, record in enumerate(table.to_pylist()):
        yield f"{path}: row {index}", record


_READERS = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}


def _json_line(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def _csv_cell(column: str, value: str) -> object:
    """CSV cells hold message lists as JSON text, and KTO's label as true or false."""
    if column == "label" and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


# --- rows ----------------------------------------------------------------------------------------------
def to_sft_row(record: object, where: str) -> dict:
    record = _object(record, where)
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
        if len(messages) < 2:
            raise DataError(f"{where}: 'messages' needs at least a user and an assistant message")
        _ends_with_assistant(messages, where, "messages")
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    if "instruction" in record and "output" in record:
        instruction, output = _text(record, "instruction", where), _text(record, "output", where)
        extra = _text(record, "input", where, required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return {"prompt": [_user(user)], "completion": [_assistant(output)]}
    if "prompt" in record and "completion" in record:
        prompt = _turns(record, "prompt", where, _user)
        completion = _turns(record, "completion", where, _assistant)
        _ends_with_assistant(completion, where, "completion")
        return {"prompt": prompt, "completion": completion}
    if "text" in record:
        return {"text": _text(record, "text", where)}
    raise DataError(f"{where}: unrecognised row with keys {sorted(record)}: expected {SFT_FORMATS}")


def to_preference_row(record: object, where: str) -> dict:
    record = _object(record, where)
    if not ("chosen" in record and "rejected" in record):
        raise DataError(f"{where}: unrecognised preference row with keys {sorted(record)}: "
                        f"expected {PREFERENCE_FORMATS}")
    if "prompt" in record:
        prompt = _turns(record, "prompt", where, _user)
        chosen = _turns(record, "chosen", where, _assistant)
        rejected = _turns(record, "rejected", where, _assistant)
    else:
        full_chosen = _messages(record["chosen"], where, "chosen")
        full_rejected = _messages(record["rejected"], where, "rejected")
        if len(full_chosen) < 2 or full_chosen[:-1] != full_rejected[:-1]:
            raise DataError(f"{where}: without 'prompt', 'chosen' and 'rejected' must be message lists "
                            "that differ only in their last (assistant) message")
        prompt, chosen, rejected = full_chosen[:-1], full_chosen[-1:], full_rejected[-1:]
    _ends_with_assistant(chosen, where, "chosen")
    _ends_with_assistant(rejected, where, "rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _object(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object (one example), got {type(record).__name__}")
    return record


def _text(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key, "" if not required else None)
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: '{key}' must not be empty")
    return value.strip()


def _turns(record: dict, key: str, where: str, as_message) -> list[dict]:
    """A string field becomes one message; a list field is validated as messages."""
    if isinstance(record[key], str):
        return [as_message(_text(record, key, where))]
    return _messages(record[key], where, key)


def _messages(value: object, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{key}' must be a non-empty string or list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {key}[{i}] must be an object with a string 'content'")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: {key}[{i}] has role {message.get('role')!r}; expected one of {', '.join(ROLES)}")
        if message["role"] == "user" and not message["content"].strip():  # as an empty instruction is refused
            raise DataError(f"{where}: {key}[{i}] is a user message with no content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _ends_with_assistant(messages: list[dict], where: str, key: str) -> None:
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(f"{where}: the last message of '{key}' must be a non-empty assistant reply "
                        "(it is what the model learns)")


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}
