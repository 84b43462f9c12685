"""`serve`: the SageMaker endpoint. Works out everything once (serve/startup.py), then runs gunicorn with
the Flask app in this process (serve/server.py); each worker gets the same Startup when it forks."""

from __future__ import annotations

import sys

from container.config import ConfigError
from container.model_dir import ModelDirError
from container.opt_ml import ContractError
from serve.custom import CustomCodeError
from serve.errors import ServeError


def main() -> None:
    from serve.server import Server
    from serve.startup import prepare

    try:
        startup = prepare()
    except (ConfigError, ContractError, ModelDirError, CustomCodeError) as e:
        sys.exit(f"serve: {e}")
    except ServeError as e:  # an adapter in LORA_ADAPTERS or the model directory that is not a peft adapter
        sys.exit(f"serve: {e.message}")
    config = startup.config
    print(f"serve: model {startup.spec.base_model} from {config.model_dir}, port {config.port}, "
          f"{startup.placement.workers} worker(s)", flush=True)
    Server(startup).run()


if __name__ == "__main__":
    main()
