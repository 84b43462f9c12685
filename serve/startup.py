"""What `serve` works out once, before gunicorn forks its workers: every worker gets this object.

The settings (serve/config.py), the folder to serve (the model directory, or HF_MODEL_ID's), custom code,
the serving spec, how many workers and which GPUs (serve/placement.py), the adapters known at start and
the LoRA rank the engine reserves. Every check that can fail fails here, in one line, before any engine
starts. No torch: the gunicorn master must not initialise CUDA before it forks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from container.config import ConfigError
from container.model_dir import ModelDirError, ServingSpec, load_spec
from serve.config import ServeConfig
from serve.custom import CustomHandlers, load_custom_handlers
from serve.engine_args import fixed_adapters, lora_wanted, max_lora_rank
from serve.model_source import model_source
from serve.placement import Placement, gpus_present, model_bytes, plan, sharded
from serve.sessions import Sessions

SHM_NEEDED = 400 * 2**20  # vLLM's multiprocess executor keeps two message queues there (160 + 240 MiB)


@dataclass(frozen=True)
class Startup:
    config: ServeConfig  # final: the folder served, the workers planned, the GPUs a model copy spans
    spec: ServingSpec
    custom: CustomHandlers | None
    placement: Placement
    gpus: int
    fixed_adapters: dict[str, str]  # name -> folder: LORA_ADAPTERS and an adapter-only model's own
    lora_rank: int  # the engine's max_lora_rank; 0 without adapters
    adapter_registry: Path | None  # the folder every worker shares for registered adapters (ENABLE_LORA)
    session_folder: Path | None = None  # the folder every worker shares for sessions (stateful sessions on)

    @property
    def predicts(self) -> bool:
        """Custom code brings its own predict_fn: no vLLM engine starts."""
        return predicts(self.custom)


def prepare(environ: Mapping[str, str] = os.environ) -> Startup:
    """ConfigError, ModelDirError or CustomCodeError, each saying what to fix, or everything a worker needs."""
    config = ServeConfig.from_env(environ)
    source = model_source(config)
    if source != config.model_dir:  # HF_MODEL_ID: the workers serve that folder
        print(f"serve: {config.model_dir} holds no model: serving HF_MODEL_ID={config.hf_model_id} from {source}",
              flush=True)
        config = replace(config, model_dir=source)
    custom = load_custom_handlers(config.model_dir)
    spec = serving_spec(config.model_dir, custom)
    gpus, gpu_bytes = gpus_present()
    if config.num_shard:  # NUM_SHARD set: one engine sharded over that many GPUs, as TGI does
        placement = sharded(config.num_shard, config.workers, gpus)
    else:
        placement = plan(config.workers, gpus, gpu_bytes, model_bytes(config.model_dir))
    config = config.with_engine_copies(placement.workers)
    if placement.span_gpus:  # vLLM's tensor parallelism over every GPU
        config = replace(config, num_shard=gpus)
    vllm = not predicts(custom)
    if vllm and (not gpus or config.num_shard > 1):  # vLLM's engine runs in worker processes
        check_shared_memory(copies=placement.workers if not gpus else 1)
    lora = vllm and lora_wanted(config, spec)
    lora_rank = max_lora_rank(config, spec) if lora else 0  # a known adapter above MAX_LORA_RANK fails here
    registry = Path(tempfile.mkdtemp(prefix="llm-twin-adapters-")) if vllm and config.enable_lora else None
    if config.stateful_sessions and custom is not None:
        raise ConfigError("SAGEMAKER_ENABLE_STATEFUL_SESSIONS is for the built-in request path: code/inference.py "
                          "handles its requests itself (keep its state there, or remove it)")
    sessions = Sessions.create_folder(config.sessions_path) if config.stateful_sessions else None
    if sessions is not None and (warning := Sessions.room_warning(sessions, config.max_sessions,
                                                                  config.max_session_bytes)):
        print(f"serve: {warning}", flush=True)
    return Startup(config, spec, custom, placement, gpus, fixed_adapters=fixed_adapters(config, spec) if lora else {},
                   lora_rank=lora_rank, adapter_registry=registry, session_folder=sessions)


def predicts(custom: CustomHandlers | None) -> bool:
    return custom is not None and "predict_fn" in custom


def serving_spec(model_dir: Path, custom: CustomHandlers | None) -> ServingSpec:
    """The model directory's spec, except that a custom model_fn may load anything: its directory needs
    no weights."""
    try:
        return load_spec(model_dir)
    except ModelDirError:
        if custom is not None and "model_fn" in custom:
            return ServingSpec(base_model=str(model_dir), max_input_tokens=0, max_total_tokens=0)
        raise


def check_shared_memory(copies: int = 1, path: str = "/dev/shm") -> None:
    """vLLM's engine runs its model in worker processes on the CPU (and across GPUs) that talk through
    /dev/shm; with too little there it fails deep in its start. Say so first, with the fix."""
    free = shutil.disk_usage(path).free if os.path.isdir(path) else copies * SHM_NEEDED
    if free < copies * SHM_NEEDED:
        raise ConfigError(f"{path} has {free // 2**20} MiB free; vLLM's engine needs about "
                          f"{copies * SHM_NEEDED // 2**20} MiB there: run the container with --shm-size=1g "
                          "(docker run's default is 64 MiB)")
