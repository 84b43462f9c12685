import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(*args, env=None):
    return subprocess.run([str(BIN / "llm-twin"), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_unknown_verb_suggests_the_nearest():
    result = run("trian")
    assert result.returncode != 0
    assert "unknown verb 'trian': did you mean 'train'?" in result.stderr


def test_other_commands_run_for_debugging():
    result = run("echo", "inside the image")
    assert result.returncode == 0 and result.stdout.strip() == "inside the image"


def test_no_argument_means_train(tmp_path):
    """SageMaker SDK v3 local mode starts training containers without a command."""
    result = run(env={"SAGEMAKER_BASE_DIR": str(tmp_path)})
    assert result.returncode != 0
    assert "input channel 'train' is missing" in (tmp_path / "output" / "failure").read_text()
