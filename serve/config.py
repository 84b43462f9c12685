"""The endpoint's configuration: one frozen dataclass, built from the environment.

Names follow TGI's launcher (`MAX_INPUT_TOKENS`, `MAX_TOTAL_TOKENS`, `MAX_BATCH_PREFILL_TOKENS`,
`MAX_BATCH_TOTAL_TOKENS`, `MAX_BATCH_SIZE`, `MAX_CONCURRENT_REQUESTS`, `NUM_SHARD`, `DTYPE`, `QUANTIZE`,
`CUDA_MEMORY_FRACTION`, `CUDA_GRAPHS`, `PREFIX_CACHING`, `LORA_ADAPTERS`; `ENABLE_LORA`, `MAX_LORAS` and
`MAX_LORA_RANK` as vLLM's SageMaker images name them) and SageMaker's model-server
conventions, so a TGI deployment's environment carries over unchanged. serve/engine_args.py turns them
into vLLM's engine arguments. Read once, by serve/startup.py, in the gunicorn master.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from container.config import ConfigError, coerce
from container.opt_ml import (MODEL_SERVER_TIMEOUT_ENV, MODEL_SERVER_WORKERS_ENV, SESSIONS_EXPIRATION_ENV,
                              SESSIONS_PATH_ENV, STATEFUL_SESSIONS_ENV, OptML, serving_port)
from serve.adapters import RESERVED_NAMES

DTYPES = ("auto", "bfloat16", "float16", "float32")
# TGI's values that vLLM 0.32 has. TGI's bitsandbytes ones are refused by name: vLLM 0.32 has no bitsandbytes
# quantization (it is not among its QUANTIZATION_METHODS), so they could only fail once the model is loading.
QUANTIZE = ("", "awq", "gptq", "fp8")
BITSANDBYTES = ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4")
PING_THREADS = 4  # HTTP threads kept free of generation work for /health, /info, /metrics (the worker answers /ping)
# Batch transform (SAGEMAKER_BATCH=true). SageMaker refuses a transform job whose MaxConcurrentTransforms x
# MaxPayloadInMB exceeds 100 MB. A mini-batch of 1 MB (the smallest above 0) of prompts is still thousands of
# generations, so the payload stays at 1 MB; two requests per engine copy keep it busy while one request's
# last records finish, and more would only make each request slower (they share the engine).
BATCH_PAYLOAD_LIMIT_MB = 100
BATCH_PAYLOAD_MB = 1
BATCH_REQUESTS_PER_ENGINE = 2
BATCH_STRATEGIES = ("MULTI_RECORD", "SINGLE_RECORD")
BATCH_TIMEOUT = 540  # under SageMaker's default InvocationsTimeoutInSeconds for batch (600 s)
# The inference toolkit's second spelling, in seconds (its first was read in minutes by MMS): either is taken.
TIMEOUT_NAMES = (MODEL_SERVER_TIMEOUT_ENV, MODEL_SERVER_TIMEOUT_ENV + "_SECONDS")
# SAGEMAKER_MODEL_SERVER_TIMEOUT, when set, is every request's limit (async endpoints allow up to 3600 s).
# Unset, a plain answer must come inside InvokeEndpoint's 60 s, or SageMaker has already answered the
# client with an error while the generation runs on; a stream keeps the longer default it had.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's engine accepts as max_lora_rank
REGISTERED_LORA_RANK = 64  # max_lora_rank when adapters may be registered later, unless MAX_LORA_RANK says
REGISTERED_LORAS = 4  # adapters an engine holds when adapters may be registered later, unless MAX_LORAS says


@dataclass(frozen=True)
class ServeConfig:
    model_dir: Path
    port: int = 8080
    workers: int = 0  # 0 = auto: one per GPU when the model fits on one, else one (spanning all GPUs)
    timeout: int = 55  # seconds a request may wait for its answer: inside InvokeEndpoint's 60 s
    stream_timeout: int = 120  # seconds a streamed answer may run
    dtype: str = "auto"  # auto: the checkpoint's own 16-bit type on GPUs; bf16 on a CPU that has it, else fp32
    quantize: str = ""
    max_input_tokens: int = 0  # 0 = from serving.json
    max_total_tokens: int = 0  # 0 = from serving.json: the engine's max model length
    max_batch_size: int = 0  # sequences the engine runs at once; 0 = vLLM's default
    max_batch_prefill_tokens: int = 0  # tokens the engine schedules per step; 0 = vLLM's default
    max_batch_total_tokens: int = 0  # KV cache size in tokens; 0 = from memory (GPU fraction, or host RAM)
    max_concurrent_requests: int = 128  # per worker; beyond it requests get 429 at once
    num_shard: int = 0  # tensor-parallel GPUs per model copy; 0 = 1, or all when the model needs them
    cuda_memory_fraction: float = 0.9  # of each GPU, for weights, activations and the KV cache
    cuda_graphs: bool = True  # TGI's CUDA_GRAPHS=0 turns them off (faster start, slower decode)
    prefix_caching: bool = True  # every request of a twin starts with the same template header
    lora_adapters: str = ""  # TGI's LORA_ADAPTERS: "name=/path,other=/path" served beside the model
    enable_lora: bool = False  # ENABLE_LORA: adapters may be registered while serving (POST /adapters)
    adapter_source_root: Path = Path("/opt/ml")  # ADAPTER_SOURCE_ROOT: POST /adapters takes src only under it
    max_loras: int = 0  # adapters an engine holds loaded (LRU beyond, pinned ones stay) and one batch mixes;
    # 0 = as many as LORA_ADAPTERS, or REGISTERED_LORAS (serve/engine_args.py lora_slots)
    max_lora_rank: int = 0  # 0 = the largest of LORA_ADAPTERS', or REGISTERED_LORA_RANK
    batch: bool = False  # SAGEMAKER_BATCH: a batch transform job's container
    # SAGEMAKER_MAX_PAYLOAD_IN_MB; None (unset): BATCH_PAYLOAD_MB; 0: SageMaker's "no limit" (sent chunked)
    max_payload_mb: int | None = None
    max_concurrent_transforms: int = 0  # SAGEMAKER_MAX_CONCURRENT_TRANSFORMS; 0 = from the engine copies
    batch_strategy: str = "MULTI_RECORD"  # SAGEMAKER_BATCH_STRATEGY
    engine_copies: int = 1  # gunicorn workers, each with its own engine (serve/startup.py sets it)
    hf_model_id: str = ""  # TGI's SageMaker HF_MODEL_ID: a hub id or a folder, used when model_dir holds no model
    hf_model_revision: str = ""
    trust_remote_code: bool = False  # HF_MODEL_TRUST_REMOTE_CODE: run a hub model's own Python code
    stateful_sessions: bool = False  # SAGEMAKER_ENABLE_STATEFUL_SESSIONS (serve/sessions.py)
    sessions_expiration: int = 1200  # SAGEMAKER_SESSIONS_EXPIRATION: seconds from a session's opening
    sessions_path: str = ""  # SAGEMAKER_SESSIONS_PATH: the folder the workers share; "" = a new one in /dev/shm
    max_sessions: int = 1000  # MAX_SESSIONS open at once on the instance
    max_sessions_per_adapter: int = 0  # MAX_SESSIONS_PER_ADAPTER: of those, one twin's at most (0: no limit)
    max_session_bytes: int = 1 << 20  # MAX_SESSION_BYTES: one session's conversation, as JSON
    max_bidirectional_streams: int = 16  # MAX_BIDIRECTIONAL_STREAMS: WebSocket connections per worker, each a thread
    max_bidirectional_streams_per_adapter: int = 0  # MAX_BIDIRECTIONAL_STREAMS_PER_ADAPTER: one twin's (0: no limit)

    @property
    def threads(self) -> int:
        """Generation requests, WebSocket connections (one thread each, idle or not), and /ping's own."""
        return self.max_concurrent_requests + self.max_bidirectional_streams + PING_THREADS

    @property
    def execution_parameters(self) -> dict:
        """What GET /execution-parameters tells a batch transform job that left them unset."""
        payload = BATCH_PAYLOAD_MB if self.max_payload_mb is None else self.max_payload_mb
        concurrency = self.max_concurrent_transforms or min(BATCH_REQUESTS_PER_ENGINE * self.engine_copies,
                                                            BATCH_PAYLOAD_LIMIT_MB // max(1, payload))
        return {"MaxConcurrentTransforms": concurrency, "BatchStrategy": self.batch_strategy, "MaxPayloadInMB": payload}

    @property
    def batch_body_bytes(self) -> int:
        """The largest mini-batch body a transform job sends: MaxPayloadInMB, or with 0 (no limit, chunked)
        the most any transform job may send, SageMaker's 100 MB."""
        return (self.execution_parameters["MaxPayloadInMB"] or BATCH_PAYLOAD_LIMIT_MB) * 2**20

    @property
    def adapters(self) -> dict[str, str]:
        """LORA_ADAPTERS as {name: path}; an entry without `name=` is named after its folder."""
        adapters = {}
        for entry in filter(None, (e.strip() for e in self.lora_adapters.split(","))):
            name, _, path = entry.rpartition("=")
            adapters[name or Path(path).name] = path
        return adapters

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "ServeConfig":
        def get(names: tuple[str, ...], kind: type, default):
            for name in names:
                raw = environ.get(name)
                if raw not in (None, ""):
                    return coerce(name, raw, kind)
            return default

        batch = get(("SAGEMAKER_BATCH",), bool, cls.batch)
        config = cls(
            model_dir=OptML.from_env(environ).model_dir,
            port=serving_port(environ),
            workers=get((MODEL_SERVER_WORKERS_ENV,), int, cls.workers),
            timeout=get(TIMEOUT_NAMES, int, BATCH_TIMEOUT if batch else cls.timeout),
            stream_timeout=get(TIMEOUT_NAMES, int, BATCH_TIMEOUT if batch else cls.stream_timeout),
            dtype=get(("DTYPE",), str, cls.dtype).lower(),
            quantize=get(("QUANTIZE", "HF_MODEL_QUANTIZE"), str, cls.quantize).lower(),
            max_input_tokens=get(("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"), int, cls.max_input_tokens),
            max_total_tokens=get(("MAX_TOTAL_TOKENS",), int, cls.max_total_tokens),
            max_batch_size=get(("MAX_BATCH_SIZE",), int, cls.max_batch_size),
            max_batch_prefill_tokens=get(("MAX_BATCH_PREFILL_TOKENS",), int, cls.max_batch_prefill_tokens),
            max_batch_total_tokens=get(("MAX_BATCH_TOTAL_TOKENS",), int, cls.max_batch_total_tokens),
            max_concurrent_requests=get(("MAX_CONCURRENT_REQUESTS",), int, cls.max_concurrent_requests),
            num_shard=get(("NUM_SHARD", "SM_NUM_GPUS"), int, cls.num_shard),
            cuda_memory_fraction=get(("CUDA_MEMORY_FRACTION",), float, cls.cuda_memory_fraction),
            cuda_graphs=environ.get("CUDA_GRAPHS", "").strip() not in ("0", "false", "False"),
            prefix_caching=get(("PREFIX_CACHING",), bool, cls.prefix_caching),
            lora_adapters=get(("LORA_ADAPTERS",), str, cls.lora_adapters),
            enable_lora=get(("ENABLE_LORA", "SM_VLLM_ENABLE_LORA"), bool, cls.enable_lora),
            adapter_source_root=Path(get(("ADAPTER_SOURCE_ROOT",), str, str(OptML.from_env(environ).root))),
            max_loras=get(("MAX_LORAS", "SM_VLLM_MAX_LORAS"), int, cls.max_loras),
            max_lora_rank=get(("MAX_LORA_RANK", "SM_VLLM_MAX_LORA_RANK"), int, cls.max_lora_rank),
            batch=batch,
            max_payload_mb=get(("SAGEMAKER_MAX_PAYLOAD_IN_MB",), int, None),
            max_concurrent_transforms=get(("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS",), int, cls.max_concurrent_transforms),
            batch_strategy=_batch_strategy(get(("SAGEMAKER_BATCH_STRATEGY",), str, cls.batch_strategy)),
            hf_model_id=get(("HF_MODEL_ID",), str, cls.hf_model_id),
            hf_model_revision=get(("HF_MODEL_REVISION",), str, cls.hf_model_revision),
            trust_remote_code=get(("HF_MODEL_TRUST_REMOTE_CODE", "TRUST_REMOTE_CODE"), bool, cls.trust_remote_code),
            stateful_sessions=get((STATEFUL_SESSIONS_ENV,), bool, cls.stateful_sessions),
            sessions_expiration=get((SESSIONS_EXPIRATION_ENV,), int, cls.sessions_expiration),
            sessions_path=get((SESSIONS_PATH_ENV,), str, cls.sessions_path),
            max_sessions=get(("MAX_SESSIONS",), int, cls.max_sessions),
            max_sessions_per_adapter=get(("MAX_SESSIONS_PER_ADAPTER",), int, cls.max_sessions_per_adapter),
            max_session_bytes=get(("MAX_SESSION_BYTES",), int, cls.max_session_bytes),
            max_bidirectional_streams=get(("MAX_BIDIRECTIONAL_STREAMS",), int, cls.max_bidirectional_streams),
            max_bidirectional_streams_per_adapter=get(("MAX_BIDIRECTIONAL_STREAMS_PER_ADAPTER",), int,
                                                      cls.max_bidirectional_streams_per_adapter),
        )
        if config.dtype not in DTYPES:
            raise ConfigError(f"DTYPE={config.dtype!r} is not valid: use one of {', '.join(DTYPES)}")
        if config.quantize in BITSANDBYTES:
            raise ConfigError(f"QUANTIZE={config.quantize} is TGI's bitsandbytes, which vLLM 0.32 does not have: "
                              "serve the 16-bit model, a pre-quantized awq or gptq one, or QUANTIZE=fp8 (8-bit "
                              "weights in flight, on GPUs with FP8: L4, L40S, H100)")
        if config.quantize not in QUANTIZE:
            raise ConfigError(f"QUANTIZE={config.quantize!r} is not valid: use one of {', '.join(QUANTIZE[1:])}, "
                              "or leave it unset")
        for name in ("timeout", "stream_timeout", "max_concurrent_requests", "sessions_expiration", "max_sessions",
                     "max_session_bytes"):
            if getattr(config, name) < 1:
                raise ConfigError(f"{name.upper()} must be at least 1, got {getattr(config, name)}")
        if config.batch_strategy not in BATCH_STRATEGIES:
            raise ConfigError(f"SAGEMAKER_BATCH_STRATEGY={config.batch_strategy!r} is not valid: use MULTI_RECORD or "
                              "SINGLE_RECORD")
        for name in ("workers", "max_input_tokens", "max_total_tokens", "max_batch_size", "max_batch_prefill_tokens",
                     "max_batch_total_tokens", "num_shard", "max_payload_mb", "max_concurrent_transforms", "max_loras",
                     "max_bidirectional_streams", "max_sessions_per_adapter", "max_bidirectional_streams_per_adapter"):
            if (getattr(config, name) or 0) < 0:
                raise ConfigError(f"{name.upper()} must not be negative, got {getattr(config, name)}")
        if not 0.05 <= config.cuda_memory_fraction <= 1.0:
            raise ConfigError(f"CUDA_MEMORY_FRACTION must be between 0.05 and 1.0, got {config.cuda_memory_fraction}")
        if config.max_lora_rank and config.max_lora_rank not in LORA_RANKS:
            raise ConfigError(f"MAX_LORA_RANK={config.max_lora_rank} is not a rank vLLM accepts: use one of "
                              f"{', '.join(map(str, LORA_RANKS))}")
        for name, path in config.adapters.items():
            if name in RESERVED_NAMES:
                raise ConfigError(f"LORA_ADAPTERS: {name!r} names the served model itself: give the adapter another "
                                  f"name (none of {', '.join(RESERVED_NAMES)})")
            if not Path(path).is_dir():
                raise ConfigError(f"LORA_ADAPTERS: adapter {name!r} is not a folder: {path} (hub ids are not "
                                  "downloaded at serve time; put the adapter in the model directory or the image)")
            if not (Path(path) / "adapter_model.safetensors").is_file():  # else vLLM would unpickle a .bin
                raise ConfigError(f"LORA_ADAPTERS: adapter {name!r} has no adapter_model.safetensors in {path} "
                                  "(adapters load from safetensors only, never pickles)")
        return config.with_engine_copies(1)

    def with_engine_copies(self, copies: int) -> "ServeConfig":
        """The config for `copies` workers: batch transform's concurrency grows with them, within SageMaker's
        100 MB product of concurrency and payload."""
        config = replace(self, engine_copies=copies)
        batch = config.execution_parameters
        if batch["MaxConcurrentTransforms"] * batch["MaxPayloadInMB"] > BATCH_PAYLOAD_LIMIT_MB:
            raise ConfigError(f"SAGEMAKER_MAX_CONCURRENT_TRANSFORMS x SAGEMAKER_MAX_PAYLOAD_IN_MB must be at most "
                              f"{BATCH_PAYLOAD_LIMIT_MB} (SageMaker refuses the transform job otherwise), got "
                              f"{batch['MaxConcurrentTransforms']} x {batch['MaxPayloadInMB']}")
        return config


def _batch_strategy(raw: str) -> str:
    """MULTI_RECORD or SINGLE_RECORD, from either spelling SageMaker uses (the API's MultiRecord too)."""
    compact = raw.replace("_", "").upper()
    return {"MULTIRECORD": "MULTI_RECORD", "SINGLERECORD": "SINGLE_RECORD"}.get(compact, raw)
