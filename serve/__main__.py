"""`serve`: the SageMaker endpoint. Checks the model directory, then runs gunicorn with the Flask app."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from container.config import ConfigError
from container.model_dir import ModelDirError
from container.opt_ml import ContractError
from serve.config import ServeConfig
from serve.custom import CustomCodeError, load_custom_handlers
from serve.model_dir import serving_spec
from serve.placement import gpus_present


def main() -> None:
    try:
        config = ServeConfig.from_env()
        spec = serving_spec(config.model_dir, load_custom_handlers(config.model_dir))
        if config.quantize.startswith("bitsandbytes") and not gpus_present()[0]:
            raise ConfigError(f"QUANTIZE={config.quantize} needs a GPU: vLLM's CPU engine has no bitsandbytes kernels "
                              "(serve the 16-bit model on the CPU)")
    except (ConfigError, ContractError, ModelDirError, CustomCodeError) as e:
        sys.exit(f"serve: {e}")
    print(f"serve: model {spec.base_model} from {config.model_dir}, port {config.port}, {config.workers} worker(s)", flush=True)
    conf = Path(__file__).with_name("gunicorn_conf.py")
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "-c", str(conf), "serve.wsgi:build()"])


if __name__ == "__main__":
    main()
