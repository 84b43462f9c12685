"""train/teacher.py's child process: a crash in native code is tried once more, anything else fails the job
naming how the child ended. A small script stands in for vLLM's child, as a real process that really aborts."""

import sys

import pytest

from train import teacher
from train.instructions import Teacher

CHILD = """
import json, os, sys
from pathlib import Path
request, result = Path(sys.argv[1]), Path(sys.argv[2])
starts = request.parent / "starts"
starts.write_text(starts.read_text() + "x" if starts.exists() else "x")
how = {how!r}[len(starts.read_text()) - 1]
if how == "abort":
    os.abort()
if how == "exit":
    sys.exit(3)
passages = json.loads(request.read_text())["passages"]
result.write_text(json.dumps([["Write about " + p, 0.5] for p in passages]))
"""


@pytest.fixture
def child(tmp_path, monkeypatch):
    """Makes the teacher's child a script that ends, start after start, as `how` says."""
    monkeypatch.setattr(teacher, "engine_name", lambda: "vLLM")

    def make(*how: str):
        script = tmp_path / "child.py"
        script.write_text(CHILD.format(how=how))
        monkeypatch.setattr(teacher, "child_command", lambda request, result: [sys.executable, str(script),
                                                                              str(request), str(result)])
    return make


def test_a_child_that_aborts_once_is_started_again_and_its_rows_come_back(child, caplog):
    child("abort", "ok")
    made = teacher.write_instructions(Teacher("/models/t", None), ["spot", "gpus"], 512)
    assert made == [("Write about spot", 0.5), ("Write about gpus", 0.5)]
    assert "was killed by SIGABRT before it finished: starting it once more" in caplog.text


@pytest.mark.parametrize("how, said", [(("abort", "abort"), "was killed by SIGABRT"),
                                       (("exit", "ok"), "failed with exit code 3")])
def test_a_second_crash_or_an_error_fails_naming_how_the_child_ended(child, how, said):
    child(*how)
    with pytest.raises(RuntimeError, match=f"the teacher's vLLM engine \\(/models/t\\) {said}: its log is above"):
        teacher.write_instructions(Teacher("/models/t", None), ["spot"], 512)
