"""Usage telemetry off: the image's environment, and `serve` and `train` outside the image, switch off what vLLM,
the Hugging Face Hub, MLflow and W&B would send home on their own (container/telemetry.py)."""

import os
import signal
import subprocess
import sys

import pytest

from container.config import ConfigError
from container.telemetry import TELEMETRY_OFF, turn_off_telemetry
from tests.helpers import REPO


def runtime_environment() -> dict[str, str]:
    """The ENV instruction of the Dockerfile's runtime stage, name -> value."""
    lines = (REPO / "Dockerfile").read_text().split(" AS runtime\n", 1)[1].splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("ENV "))
    words = []
    for line in lines[start:]:
        words += line.removeprefix("ENV ").rstrip("\\").split()
        if not line.endswith("\\"):
            break
    return dict(word.split("=", 1) for word in words)


def test_the_image_runs_with_telemetry_off():
    environment = runtime_environment()
    issue = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    assert issue.items() <= environment.items()
    assert TELEMETRY_OFF.items() <= environment.items()  # the same switches as a run outside the image


def test_each_library_reads_its_switch_as_off(tmp_path):
    """The values matter: vLLM reads DO_NOT_TRACK only as "1", MLflow only as "true"."""
    code = ("from vllm.usage.usage_lib import is_usage_stats_enabled\n"
            "from huggingface_hub import constants\n"
            "from mlflow.telemetry.utils import is_telemetry_disabled\n"
            "import wandb.env\n"
            "print(is_usage_stats_enabled(), constants.HF_HUB_DISABLE_TELEMETRY, is_telemetry_disabled(),"
            " wandb.env.error_reporting_enabled())\n")
    environment = {name: value for name, value in os.environ.items() if name not in TELEMETRY_OFF}
    environment["HOME"] = str(tmp_path)  # no ~/.config/vllm/do_not_track to turn vLLM's off instead
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**environment, **TELEMETRY_OFF})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "True", "True", "False"]


def test_a_value_the_environment_already_has_is_kept():
    environ = {"DO_NOT_TRACK": "0"}
    turn_off_telemetry(environ)
    assert environ == {**TELEMETRY_OFF, "DO_NOT_TRACK": "0"}


def test_serve_outside_the_image_turns_it_off_before_anything_loads(monkeypatch):
    import serve.__main__
    import serve.startup

    for name in TELEMETRY_OFF:
        monkeypatch.delenv(name, raising=False)
    seen = {}

    def prepare():
        seen.update({name: os.environ.get(name) for name in TELEMETRY_OFF})
        raise ConfigError("stop here")

    monkeypatch.setattr(serve.startup, "prepare", prepare)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit, match="stop here"):
            serve.__main__.main()
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert seen == TELEMETRY_OFF
