import csv
import json

import pytest

from train.data import DataError, load_preference_rows, load_sft_rows, split_rows

USER, ASSISTANT = {"role": "user", "content": "Write a post"}, {"role": "assistant", "content": "Here it is."}
EXPECTED = {"prompt": [USER], "completion": [ASSISTANT]}


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("record", [
    {"instruction": "Write a post", "output": "Here it is."},
    {"prompt": "Write a post", "completion": "Here it is."},
    {"prompt": [USER], "completion": [ASSISTANT]},
    {"messages": [USER, ASSISTANT]},
], ids=["alpaca", "prompt-completion", "conversational-prompt-completion", "messages"])
def test_every_sft_format_becomes_the_same_conversation(tmp_path, record):
    write(tmp_path / "a.jsonl", [json.dumps(record)])
    assert load_sft_rows(tmp_path) == [EXPECTED]


def test_alpaca_input_and_multi_turn_messages(tmp_path):
    write(tmp_path / "a.jsonl", [
        json.dumps({"instruction": "Summarise", "input": "notes", "output": "Short."}),
        json.dumps({"messages": [{"role": "system", "content": "You are Dana."}, USER, ASSISTANT,
                                 {"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure."}]}),
    ])
    rows = load_sft_rows(tmp_path)
    assert rows[0]["prompt"][0]["content"] == "Summarise\n\nnotes"
    assert [m["role"] for m in rows[1]["prompt"]] == ["system", "user", "assistant", "user"]
    assert rows[1]["completion"] == [{"role": "assistant", "content": "Sure."}]


def test_every_file_type_reads_the_same_rows(tmp_path):
    records = [{"instruction": "Write a post", "output": "Here it is."}, {"messages": [USER, ASSISTANT]}]
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "jsonl").mkdir()
    write(tmp_path / "jsonl" / "d.jsonl", [json.dumps(r) for r in records])
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "d.json").write_text(json.dumps(records))
    (tmp_path / "csv").mkdir()
    with open(tmp_path / "csv" / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "output"])
        writer.writeheader()
        writer.writerow(records[0])
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.Table.from_pylist([{"messages": [USER, ASSISTANT]}]), tmp_path / "parquet" / "d.parquet")

    assert load_sft_rows(tmp_path / "jsonl") == [EXPECTED, EXPECTED]
    assert load_sft_rows(tmp_path / "json") == [EXPECTED, EXPECTED]
    assert load_sft_rows(tmp_path / "csv") == [EXPECTED]
    assert load_sft_rows(tmp_path / "parquet") == [EXPECTED]
    assert len(load_sft_rows(tmp_path)) == 6  # subfolders and several files per channel


def test_csv_message_lists_are_json_cells_and_errors_name_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('messages\n"[{""role"": ""user"", ""content"": ""Write a post""}, '
                    '{""role"": ""assistant"", ""content"": ""Here it is.""}]"\n"[]"\n')
    with pytest.raises(DataError, match=r"d\.csv:3: 'messages' must be a non-empty"):
        load_sft_rows(tmp_path)


def test_text_rows_and_mixing_kinds(tmp_path):
    write(tmp_path / "a.jsonl", [json.dumps({"text": "plain text"})])
    assert load_sft_rows(tmp_path) == [{"text": "plain text"}]
    write(tmp_path / "b.jsonl", [json.dumps({"instruction": "x", "output": "y"})])
    with pytest.raises(DataError, match=r"b\.jsonl:1: a conversation row among text rows"):
        load_sft_rows(tmp_path)


@pytest.mark.parametrize("line,message", [
    ('{"instruction": "x", "output": ', "invalid JSON"),
    ('["a list"]', "expected an object \\(one example\\), got list"),
    ('{"question": "x", "answer": "y"}', "unrecognised row with keys \\['answer', 'question'\\]"),
    ('{"instruction": "x", "output": 3}', "'output' must be a string"),
    ('{"instruction": " ", "output": "y"}', "must not be empty"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}',
     "messages\\[1\\] has role 'bot'"),
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}',
     "last message of 'messages'"),
    ('{"prompt": "x", "completion": [{"role": "user", "content": "y"}]}', "last message of 'completion'"),
    ('{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]}',
     "messages\\[0\\] is a user message with no content"),
])
def test_malformed_rows_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "data.jsonl", [json.dumps({"instruction": "ok", "output": "ok"}), line])
    with pytest.raises(DataError, match=f"{path}:2: .*{message}"):
        load_sft_rows(tmp_path)


def test_json_array_errors_name_the_item(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}]))
    with pytest.raises(DataError, match=r"d\.json: item 1: unrecognised row"):
        load_sft_rows(tmp_path)


def test_empty_file_and_empty_channel_are_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"no data files .*found: notes\.txt"):
        load_sft_rows(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: the file has no examples"):
        load_sft_rows(tmp_path)


def test_preference_rows_standard_conversational_and_implicit_prompt(tmp_path):
    other = {"role": "assistant", "content": "Meh."}
    write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "Write a post", "chosen": "Here it is.", "rejected": "Meh."}),
        json.dumps({"prompt": [USER], "chosen": [ASSISTANT], "rejected": [other]}),
        json.dumps({"chosen": [USER, ASSISTANT], "rejected": [USER, other]}),
    ])
    expected = {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [other]}
    assert load_preference_rows(tmp_path) == [expected] * 3


@pytest.mark.parametrize("record,message", [
    ({"prompt": "x", "chosen": "y"}, "unrecognised preference row"),
    ({"chosen": [USER, ASSISTANT], "rejected": [{"role": "user", "content": "other"}, ASSISTANT]},
     "differ only in their last"),
    ({"prompt": "x", "chosen": "", "rejected": "z"}, "'chosen' must not be empty"),
])
def test_bad_preference_rows(tmp_path, record, message):
    write(tmp_path / "p.jsonl", [json.dumps(record)])
    with pytest.raises(DataError, match=f"p.jsonl:1: .*{message}"):
        load_preference_rows(tmp_path)


def test_split_holds_out_a_deterministic_fraction():
    rows = [{"text": str(i)} for i in range(100)]
    train, held_out = split_rows(rows, 0.05, seed=1)
    assert (len(train), len(held_out)) == (95, 5)
    assert split_rows(rows, 0.05, seed=1) == (train, held_out)
    assert split_rows(rows[:10], 0.05, seed=1)[1] != []  # at least one row when asked for a fraction
    assert split_rows(rows, 0.0, seed=1) == (rows, [])


def test_kto_takes_unpaired_rows_and_splits_pairs_into_a_good_and_a_bad_one(tmp_path):
    from train.data import load_kto_rows

    (tmp_path / "u.jsonl").write_text(json.dumps({"prompt": "Hi", "completion": "Hello!", "label": True}) + "\n" +
                                      json.dumps({"prompt": "Hi", "chosen": "Hey.", "rejected": "Greetings, user."})
                                      + "\n")
    rows = load_kto_rows(tmp_path)
    assert [(r["completion"][-1]["content"], r["label"]) for r in rows] == [("Hello!", True), ("Hey.", True),
                                                                            ("Greetings, user.", False)]
    (tmp_path / "u.jsonl").write_text(json.dumps({"prompt": "Hi", "completion": "Hello!", "label": True}) + "\n")
    with pytest.raises(DataError, match="KTO needs both good .* and bad"):
        load_kto_rows(tmp_path)


def test_files_that_are_not_plain_utf8_are_read_or_refused_naming_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    row = json.dumps({"instruction": "Write a post", "output": "Here it is."})
    path.write_bytes(b"\xef\xbb\xbf" + row.encode() + b"\r\n")  # Notepad's BOM and CRLF: read
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "d-checkpoint.jsonl").write_text(row + "\n")  # a notebook's copy: not data
    assert load_sft_rows(tmp_path) == [EXPECTED]
    path.write_bytes(row.encode() + b'\n{"instruction": "caf\xe9", "output": "x"}\n')  # Latin-1
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 text \(invalid byte 0xe9 .*save it as UTF-8"):
        load_sft_rows(tmp_path)
    path.write_bytes(b"\x1f\x8b\x08\x00rest")
    with pytest.raises(DataError, match=r"d\.jsonl: gzip-compressed: decompress it"):
        load_sft_rows(tmp_path)


def test_csv_from_excel_long_cells_kto_labels_and_an_unclosed_quote(tmp_path):
    from train.data import load_kto_rows

    path = tmp_path / "d.csv"
    article = "word " * 40_000  # 200 kB in one cell: over the csv module's default limit
    path.write_text(f"\ufeffinstruction,output\nWrite a post,Here it is.\nWrite long,{article}\n", encoding="utf-8")
    rows = load_sft_rows(tmp_path)
    assert rows[0] == EXPECTED and rows[1]["completion"][0]["content"] == article.strip()
    path.write_text('instruction,output\n\nA,"Done,\nin two lines."\n\nB,"Two\nC,Three\n')  # blank lines skipped
    with pytest.raises(DataError, match=r"d\.csv:6: malformed CSV \(unexpected end of data"):
        load_sft_rows(tmp_path)
    path.write_text("prompt,completion,label\nHi,Hello!,true\nHi,Go away.,FALSE\n")
    assert [row["label"] for row in load_kto_rows(tmp_path)] == [True, False]
