"""gunicorn's application factory (`serve.wsgi:build()`), called once in each worker process."""

from __future__ import annotations

import logging

from serve.app import create_app
from serve.config import ServeConfig
from serve.engine import Engine
from container.model_dir import load_spec


def build():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServeConfig.from_env()
    engine = Engine(config, load_spec(config.model_dir))
    engine.start()  # loads and warms the model in the engine thread; /ping says 503 until it is done
    return create_app(engine)
