"""Usage telemetry off: the libraries inside train and serve send nothing home on their own.

The image sets these in its environment (the Dockerfile's ENV); `train` and `serve` set them at start too, so
that a run outside the image (`make demo`, the tests, a laptop) sends nothing either. A value already set is
kept: the environment has the last word.

    VLLM_NO_USAGE_STATS      vLLM's usage report at engine start (hardware, model architecture, settings)
    DO_NOT_TRACK             the convention (https://donottrack.sh); vLLM and the Hugging Face Hub read "1"
    HF_HUB_DISABLE_TELEMETRY the Hub's pings from transformers, TRL (every trainer) and datasets
    MLFLOW_DISABLE_TELEMETRY MLflow's usage events (it reads DO_NOT_TRACK only when it is "true")
    WANDB_ERROR_REPORTING    W&B's crash reports to its error tracker (a run's own data still goes to W&B)
"""

from __future__ import annotations

import os
from typing import MutableMapping

TELEMETRY_OFF = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "WANDB_ERROR_REPORTING": "false",
}


def turn_off_telemetry(environ: MutableMapping[str, str] = os.environ) -> None:
    """Before any of those libraries is imported: they read the variables when they load or first report."""
    for name, value in TELEMETRY_OFF.items():
        environ.setdefault(name, value)
