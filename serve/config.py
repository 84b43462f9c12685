"""The endpoint's configuration: one frozen dataclass, built from the environment.

Variable names follow TGI (`DTYPE`) and SageMaker's model-server conventions where one exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from container.config import ConfigError, coerce
from container.opt_ml import MODEL_SERVER_TIMEOUT_ENV, MODEL_SERVER_WORKERS_ENV, OptML, serving_port

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ServeConfig:
    model_dir: Path
    port: int = 8080
    workers: int = 1  # one model copy per worker: more only when there are devices for them
    threads: int = 16  # HTTP threads per worker; the engine thread owns the model
    timeout: int = 120  # seconds a request may wait for its generation
    dtype: str = "auto"  # auto: bf16 on GPUs that have it (else fp16), bf16 on the CPU (faster there)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "ServeConfig":
        def get(name: str, kind: type, default):
            raw = environ.get(name)
            return default if raw in (None, "") else coerce(name, raw, kind)

        config = cls(
            model_dir=OptML.from_env(environ).model_dir,
            port=serving_port(environ),
            workers=get(MODEL_SERVER_WORKERS_ENV, int, cls.workers),
            threads=get("SERVER_THREADS", int, cls.threads),
            timeout=get(MODEL_SERVER_TIMEOUT_ENV, int, cls.timeout),
            dtype=get("DTYPE", str, cls.dtype).lower(),
        )
        if config.dtype not in DTYPES:
            raise ConfigError(f"DTYPE={config.dtype!r} is not valid: use one of {', '.join(DTYPES)}")
        for name in ("workers", "threads", "timeout"):
            if getattr(config, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(config, name)}")
        return config
