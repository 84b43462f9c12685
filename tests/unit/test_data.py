import json

import pytest

from train.data import DataError, load_sft_rows


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_instruction_and_messages_rows_become_prompt_completion(tmp_path):
    write(tmp_path / "a.jsonl", [
        json.dumps({"instruction": "Write a post", "output": "Here it is."}),
        "",
        json.dumps({"instruction": "Summarise", "input": "notes", "output": "Short."}),
    ])
    write(tmp_path / "b.jsonl", [json.dumps({"messages": [
        {"role": "system", "content": "You are Dana."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"},
        {"role": "assistant", "content": "Sure."}]})])
    rows = load_sft_rows(tmp_path)
    assert rows[0] == {"prompt": [{"role": "user", "content": "Write a post"}],
                       "completion": [{"role": "assistant", "content": "Here it is."}]}
    assert rows[1]["prompt"][0]["content"] == "Summarise\n\nnotes"
    assert [m["role"] for m in rows[2]["prompt"]] == ["system", "user", "assistant", "user"]
    assert rows[2]["completion"] == [{"role": "assistant", "content": "Sure."}]


@pytest.mark.parametrize("line,message", [
    ('{"instruction": "x", "output": ', "invalid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"prompt": "x", "answer": "y"}', "unrecognised row with keys \\['answer', 'prompt'\\]"),
    ('{"instruction": "x", "output": 3}', "'output' must be a string"),
    ('{"instruction": " ", "output": "y"}', "must not be empty"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}', "messages\\[1\\] has role 'bot'"),
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}', "last message must be"),
])
def test_malformed_rows_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "data.jsonl", [json.dumps({"instruction": "ok", "output": "ok"}), line])
    with pytest.raises(DataError, match=f"{path}:2: .*{message}"):
        load_sft_rows(tmp_path)


def test_empty_file_and_empty_channel_are_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"no \.jsonl files .*found: notes\.txt"):
        load_sft_rows(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: the file has no examples"):
        load_sft_rows(tmp_path)
