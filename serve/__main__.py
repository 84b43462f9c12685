"""`serve`: the SageMaker endpoint. Works out everything once (serve/startup.py), then runs gunicorn with
the Flask app in this process (serve/server.py); each worker gets the same Startup when it forks."""

from __future__ import annotations

import signal
import sys

from container.config import ConfigError
from container.model_dir import ModelDirError
from container.opt_ml import ContractError
from container.telemetry import turn_off_telemetry
from serve.custom import CustomCodeError
from serve.errors import ServeError


def main() -> None:
    """SIGTERM from the first instruction: before gunicorn's own handlers (downloading HF_MODEL_ID, checking
    the model) it ends the start at once, exit 143; the entrypoint held any that came while it exec'd."""
    signal.signal(signal.SIGTERM, _stopped)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    turn_off_telemetry()  # before vLLM loads (its engine processes inherit it)
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


def _stopped(signum, frame) -> None:
    print("serve: stopped by SIGTERM before the server started", file=sys.stderr, flush=True)
    sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
