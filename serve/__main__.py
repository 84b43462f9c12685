"""`serve`: the SageMaker endpoint. Checks the model directory, then runs gunicorn with the Flask app."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from container.config import ConfigError
from container.model_dir import ModelDirError, load_spec
from container.opt_ml import ContractError
from serve.config import ServeConfig


def main() -> None:
    try:
        config = ServeConfig.from_env()
        spec = load_spec(config.model_dir)
    except (ConfigError, ContractError, ModelDirError) as e:
        sys.exit(f"serve: {e}")
    print(f"serve: model {spec.base_model} from {config.model_dir}, port {config.port}, {config.workers} worker(s)", flush=True)
    conf = Path(__file__).with_name("gunicorn_conf.py")
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "-c", str(conf), "serve.wsgi:build()"])


if __name__ == "__main__":
    main()
