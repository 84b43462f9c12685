"""Instruction data from a channel folder, validated row by row, as TRL conversational prompt/completion.

Accepted JSONL rows (one JSON object per line; blank lines are skipped):

    {"instruction": "...", "output": "..."}                 Alpaca; an optional "input" is appended
    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}

Every row becomes {"prompt": [messages...], "completion": [assistant message]}: TRL then applies the
model's chat template and computes the loss on the completion only. For `messages` rows the completion
is the last assistant turn, which must end the conversation; earlier turns are context.
No torch here: data errors surface before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_SUFFIXES = (".jsonl",)
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """The training data is wrong; the message names the file and line."""


def load_sft_rows(channel_dir: Path) -> list[dict]:
    files = sorted(p for p in channel_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    data_files = [p for p in files if p.suffix in DATA_SUFFIXES]
    if not data_files:
        found = ", ".join(p.name for p in files[:5]) or "nothing"
        raise DataError(f"no .jsonl files in {channel_dir} (found: {found})")
    rows: list[dict] = []
    for path in data_files:
        rows.extend(_read_jsonl(path))
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            rows.append(to_prompt_completion(record, where))
    if not rows:
        raise DataError(f"{path}: the file has no examples")
    return rows


def to_prompt_completion(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _from_messages(record["messages"], where)
    if "instruction" in record and "output" in record:
        return _from_instruction(record, where)
    raise DataError(
        f"{where}: unrecognised row with keys {sorted(record)}: expected "
        '{"instruction", "output"[, "input"]} or {"messages": [...]}'
    )


def _from_instruction(record: dict, where: str) -> dict:
    for key in ("instruction", "output", "input"):
        if key in record and not isinstance(record[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")
    instruction, output = record["instruction"].strip(), record["output"].strip()
    if not instruction or not output:
        raise DataError(f"{where}: 'instruction' and 'output' must not be empty")
    extra = record.get("input", "").strip()
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return {"prompt": [{"role": "user", "content": user}], "completion": [{"role": "assistant", "content": output}]}


def _from_messages(messages: object, where: str) -> dict:
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where}: 'messages' must be a list of at least a user and an assistant message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with a string 'content'")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}] has role {message.get('role')!r}; expected one of {', '.join(ROLES)}")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(f"{where}: the last message must be a non-empty assistant reply (it is what the model learns)")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return {"prompt": clean[:-1], "completion": clean[-1:]}
