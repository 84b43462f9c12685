"""train/teacher.py's child process: its rows are used once it has written them all, however it ends after;
a child that ends before fails the job naming how. A small script stands in for vLLM's child, as a real
process that really aborts."""

import os
import sys
import time
from pathlib import Path

import pytest

from train import teacher
from train.instructions import Teacher

CHILD = """
import json, os, sys
from pathlib import Path
request, result = Path(sys.argv[1]), Path(sys.argv[2])
if {how!r} == "abort":
    os.abort()
if {how!r} == "exit":
    sys.exit(3)
passages = json.loads(request.read_text())["passages"]
result.write_text("".join(json.dumps({{"instruction": "Write about " + p, "score": 0.5}}) + "\\n" for p in passages))
if {how!r} == "abort after writing":
    os.abort()
"""


@pytest.fixture
def child(tmp_path, monkeypatch):
    """Makes the teacher's child a script that ends as `how` says."""
    monkeypatch.setattr(teacher, "engine_name", lambda: "vLLM")

    def make(how: str):
        script = tmp_path / "child.py"
        script.write_text(CHILD.format(how=how))
        monkeypatch.setattr(teacher, "child_command", lambda request, result: [sys.executable, str(script),
                                                                              str(request), str(result)])
    return make


def test_a_child_that_aborts_after_writing_every_row_gives_its_rows(child, caplog):
    child("abort after writing")
    made = teacher.write_instructions(Teacher("/models/t", None), ["spot", "gpus"], 512)
    assert made == [("Write about spot", 0.5), ("Write about gpus", 0.5)]
    assert "was killed by SIGABRT after writing every row: the rows are used" in caplog.text


@pytest.mark.parametrize("how, said", [("abort", "was killed by SIGABRT"), ("exit", "failed with exit code 3")])
def test_a_child_that_ends_before_its_rows_fails_the_job_naming_how(child, how, said):
    child(how)
    with pytest.raises(RuntimeError, match=f"the teacher's vLLM engine \\(/models/t\\) {said}: its log is above"):
        teacher.write_instructions(Teacher("/models/t", None), ["spot"], 512)


def test_no_process_the_child_started_outlives_it(child, tmp_path):
    """A grandchild left running (as vLLM's engine would be, were the child to die first) is killed with it."""
    child("exit")  # the fixture's command; the script is replaced below
    pid_file = tmp_path / "grandchild.pid"
    (tmp_path / "child.py").write_text(
        "import subprocess, sys\n"
        "from pathlib import Path\n"
        "sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"Path({str(pid_file)!r}).write_text(str(sleeper.pid))\n"
        "Path(sys.argv[2]).write_text('')\n")
    assert teacher.write_instructions(Teacher("/models/t", None), [], 512) == []
    status = Path(f"/proc/{pid_file.read_text()}/status")
    for _ in range(100):  # killed at once, then reaped by init
        if not status.exists() or "zombie" in status.read_text():
            return
        time.sleep(0.1)
    os.kill(int(pid_file.read_text()), 9)
    raise AssertionError("the child's own child was still running after it")
