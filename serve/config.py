"""The endpoint's configuration: one frozen dataclass, built from the environment.

Names follow TGI's launcher (`MAX_INPUT_TOKENS`, `MAX_TOTAL_TOKENS`, `MAX_BATCH_SIZE`,
`MAX_CONCURRENT_REQUESTS`, `DTYPE`, `QUANTIZE`) and SageMaker's model-server conventions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from container.config import ConfigError, coerce
from container.opt_ml import MODEL_SERVER_TIMEOUT_ENV, MODEL_SERVER_WORKERS_ENV, OptML, serving_port

DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZE = ("", "bitsandbytes")
PING_THREADS = 4  # HTTP threads kept free of generation work, so /ping always finds one


@dataclass(frozen=True)
class ServeConfig:
    model_dir: Path
    port: int = 8080
    workers: int = 0  # 0 = auto: one per GPU when the model fits on one, else one (spanning all GPUs)
    timeout: int = 120  # seconds a request may wait for its generation
    dtype: str = "auto"  # auto: bf16 on GPUs that have it (else fp16), bf16 on the CPU (faster there)
    quantize: str = ""  # "bitsandbytes": load the weights in 4-bit nf4
    max_input_tokens: int = 0  # 0 = from serving.json
    max_total_tokens: int = 0  # 0 = from serving.json
    max_batch_size: int = 32  # sequences decoded together in one forward pass
    max_concurrent_requests: int = 128  # per worker; beyond it requests get 429 at once
    device_map: str = ""  # "auto": spread the model over all visible GPUs (set by serve/gunicorn_conf.py)

    @property
    def threads(self) -> int:
        return self.max_concurrent_requests + PING_THREADS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "ServeConfig":
        def get(names: tuple[str, ...], kind: type, default):
            for name in names:
                raw = environ.get(name)
                if raw not in (None, ""):
                    return coerce(name, raw, kind)
            return default

        config = cls(
            model_dir=OptML.from_env(environ).model_dir,
            port=serving_port(environ),
            workers=get((MODEL_SERVER_WORKERS_ENV,), int, cls.workers),
            timeout=get((MODEL_SERVER_TIMEOUT_ENV,), int, cls.timeout),
            dtype=get(("DTYPE",), str, cls.dtype).lower(),
            quantize=get(("QUANTIZE", "HF_MODEL_QUANTIZE"), str, cls.quantize).lower(),
            max_input_tokens=get(("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"), int, cls.max_input_tokens),
            max_total_tokens=get(("MAX_TOTAL_TOKENS",), int, cls.max_total_tokens),
            max_batch_size=get(("MAX_BATCH_SIZE",), int, cls.max_batch_size),
            max_concurrent_requests=get(("MAX_CONCURRENT_REQUESTS",), int, cls.max_concurrent_requests),
            device_map=get(("SERVE_DEVICE_MAP",), str, cls.device_map),
        )
        if config.dtype not in DTYPES:
            raise ConfigError(f"DTYPE={config.dtype!r} is not valid: use one of {', '.join(DTYPES)}")
        if config.quantize not in QUANTIZE:
            raise ConfigError(f"QUANTIZE={config.quantize!r} is not valid: use bitsandbytes, or leave it unset")
        for name in ("timeout", "max_batch_size", "max_concurrent_requests"):
            if getattr(config, name) < 1:
                raise ConfigError(f"{name.upper()} must be at least 1, got {getattr(config, name)}")
        for name in ("workers", "max_input_tokens", "max_total_tokens"):
            if getattr(config, name) < 0:
                raise ConfigError(f"{name.upper()} must not be negative, got {getattr(config, name)}")
        return config
