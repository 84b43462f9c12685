"""gunicorn's application factory (`serve.wsgi:build()`), called once in each worker process."""

from __future__ import annotations

import logging

from serve.app import create_app
from serve.config import ServeConfig
from serve.custom import load_custom_handlers
from serve.engine import Engine
from serve.model_dir import serving_spec


def build():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServeConfig.from_env()
    custom = load_custom_handlers(config.model_dir)
    engine = Engine(config, serving_spec(config.model_dir, custom), custom)
    engine.start()  # starts vLLM and warms it in the engine thread; /ping says 503 until it is done
    return create_app(engine)
