"""How many gunicorn workers, and which GPUs each one gets. No torch: this runs in the gunicorn master,
which must not initialise CUDA before it forks.

One worker per model copy: one per GPU when the model fits on one (each worker sees only its GPU
through CUDA_VISIBLE_DEVICES), otherwise a single worker whose model spans every GPU
(vLLM tensor parallelism, NUM_SHARD). On the CPU, one worker: threads do the I/O, the engine thread batches.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from container.config import ConfigError
from container.model_dir import ModelDirError, ServingSpec, resolve_base
from container.opt_ml import MODEL_SERVER_WORKERS_ENV

FIT_MARGIN = 1.3  # weights plus room for the KV cache and activations of a batch


@dataclass(frozen=True)
class Placement:
    workers: int
    pin_gpus: bool  # each worker gets one GPU of its own
    span_gpus: bool  # the single worker spreads the model over all GPUs


def plan(requested_workers: int, gpus: int, gpu_bytes: int, model_bytes: int | None) -> Placement:
    """`model_bytes` None means unknown (a hub base not yet downloaded): plan as if it does not fit one GPU."""
    if gpus == 0:
        return Placement(requested_workers or 1, pin_gpus=False, span_gpus=False)
    fits_one = model_bytes is not None and model_bytes * FIT_MARGIN <= gpu_bytes
    if requested_workers:
        # Each worker's engine takes the memory of the GPUs it sees (CUDA_MEMORY_FRACTION of each): two on
        # one GPU, or two copies spanning the same GPUs, fail to load or run out of memory.
        most = gpus if fits_one else 1
        if requested_workers > most:
            why = (f"the model fits one GPU, so one worker per GPU ({gpus})" if fits_one else
                   f"the model spans all {gpus} GPUs (or its size is not known yet), so one worker")
            raise ConfigError(f"{MODEL_SERVER_WORKERS_ENV}={requested_workers} is more workers than the GPUs hold: "
                              f"{why}; each worker's engine batches its requests, so unset it or use at most {most}")
        return Placement(requested_workers, pin_gpus=fits_one and gpus > 1, span_gpus=not fits_one and gpus > 1)
    if fits_one:
        return Placement(gpus, pin_gpus=gpus > 1, span_gpus=False)
    return Placement(1, pin_gpus=False, span_gpus=gpus > 1)


def sharded(shards: int, requested_workers: int, gpus: int) -> Placement:
    """NUM_SHARD: one engine over `shards` GPUs, as TGI runs it. More workers would each take the same GPUs."""
    if shards > max(gpus, 1):
        raise ConfigError(f"NUM_SHARD={shards} shards the model over {shards} GPUs, and this host has {gpus}")
    if requested_workers > 1:
        raise ConfigError(f"NUM_SHARD={shards} runs one engine over {shards} GPUs; {MODEL_SERVER_WORKERS_ENV}="
                          f"{requested_workers} would start {requested_workers} of them on the same GPUs: unset it")
    return Placement(1, pin_gpus=False, span_gpus=False)


def free_gpu(taken: set[int], gpus: int) -> int:
    """The lowest GPU index no live worker holds (a restarted worker takes its predecessor's GPU)."""
    return min(set(range(gpus)) - taken) if len(taken) < gpus else 0


def gpus_present() -> tuple[int, int]:
    """(GPU count, memory of the smallest GPU in bytes), from nvidia-smi; (0, 0) without one."""
    if shutil.which("nvidia-smi") is None:
        return 0, 0
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return 0, 0
    sizes = [int(line) * 2**20 for line in out.split() if line.strip().isdigit()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        sizes = sizes[: len([v for v in visible.split(",") if v.strip()])]
    return len(sizes), min(sizes, default=0)


def model_bytes(model_dir: Path) -> int | None:
    """Size of the weights a worker will hold: for an adapter-only directory, its base model's; None when
    that base is a hub id, unknown until downloaded."""
    weights_dir = model_dir
    try:
        spec = ServingSpec.read(model_dir)
        if spec.weights == "adapter":
            weights_dir = Path(resolve_base(spec.base_model))
    except ModelDirError:
        pass  # no serving.json: a plain transformers folder
    if not weights_dir.is_dir():
        return None
    return sum(f.stat().st_size for f in weights_dir.glob("*.safetensors"))
