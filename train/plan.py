"""How a stage will run on this machine, decided before it trains: the device and its precision, the dtype the
weights load in, packing and gradient checkpointing, and the refusals of a job that cannot fit its GPUs
(train/distributed.py training_bytes) or its volume. Reads nothing but the config, the (possibly empty) model
and the disk."""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from container.config import ConfigError
from train.checkpoints import saved_checkpoints
from train.config import TrainConfig
from train.distributed import SHARDED, native_bf16, strategy, trainable_count, training_bytes, world_size
from train.export import volumes_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    use_cpu: bool
    bf16: bool
    dtype: torch.dtype
    attn_implementation: str | None  # flash_attention_2 when installed on a GPU, else the default (sdpa)
    liger: bool


def detect_device(config: TrainConfig) -> Device:
    cuda = torch.cuda.is_available()
    bf16_supported = native_bf16()
    if config.bf16 == "true" and not bf16_supported:
        raise ConfigError("hyperparameter bf16=true needs a GPU with bfloat16 support (Ampere or newer); use bf16=auto")
    bf16 = bf16_supported if config.bf16 == "auto" else config.bf16 == "true"
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    return Device(use_cpu=not cuda, bf16=bf16, dtype=torch.bfloat16 if bf16 else torch.float32,
                  attn_implementation="flash_attention_2" if flash else None, liger=liger)


def weights_dtype(config: TrainConfig, device: Device, planned: str) -> torch.dtype:
    """The dtype the model's weights load in. Full fine-tuning keeps fp32 weights, the master copy that mixed
    precision updates while bf16 computes under the Trainer's autocast: stored in bf16, a weight keeps 8 bits of
    mantissa, and an AdamW step under half its last bit rounds away. At full fine-tuning's learning rates that is
    most steps (3 steps moved 3.8% of SmolLM2's bf16 weights at 2e-5, 0.3% at DPO's 5e-7; 100% in fp32), and
    TRL loads a model it is given by name in fp32 for this reason. Sharded (`planned`, planned_strategy()'s
    choice), DeepSpeed keeps its own fp32 master copy and accelerate's FSDP casts what trains to fp32 itself, so
    the weights load in bf16 there, as LoRA's frozen base does, and every process's host copy stays small."""
    if config.adapter == "full" and device.bf16 and planned not in SHARDED:
        return torch.float32
    return device.dtype


def use_packing(config: TrainConfig, device: Device) -> bool:
    """Padding-free packing keeps examples apart through position ids; it pays with flash-attention's
    variable-length kernels. On SDPA (and on the CPU) it is slower than length-grouped batches."""
    if config.packing == "auto":
        return device.attn_implementation == "flash_attention_2"
    return config.packing == "true"


def use_gradient_checkpointing(config: TrainConfig, model, choice: str, stage: str) -> bool:
    """auto: on when weights, gradients and optimizer state would take over half the GPU's memory (sharded: each
    GPU's share of them, about)."""
    if config.gradient_checkpointing != "auto":
        return config.gradient_checkpointing == "true"
    if not torch.cuda.is_available():
        return False
    need = training_bytes(config, model, choice, stage) // (world_size() if choice in SHARDED else 1)
    total = torch.cuda.get_device_properties(0).total_memory
    on = need > 0.5 * total
    log.info("gradient_checkpointing=auto: about %.1f GiB of weights and optimizer state on a %.1f GiB GPU -> %s",
             need / 2**30, total / 2**30, "on" if on else "off")
    return on


def check_fits(config: TrainConfig, model, stage: str) -> None:
    """Refuse a job whose weights, gradients and optimizer state alone exceed a GPU's memory, where that GPU holds
    all of them (one GPU, or DDP): it would fail with CUDA out of memory at its first step. The stages still to
    run are checked too, so that a DPO stage with its frozen reference is not refused after hours of SFT."""
    if not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    stages = config.stages[config.stages.index(stage):] if stage in config.stages else (stage,)
    for later in stages:
        choice = strategy(config, model, later)
        need = training_bytes(config, model, choice, later)
        if choice not in ("single", "ddp") or need <= total:
            continue
        instead = {"full": "use adapter=lora or adapter=qlora, or shard it with distributed=zero3 over enough GPUs",
                   "lora": "use adapter=qlora, or shard it with distributed=zero3 over enough GPUs",
                   "qlora": "use a GPU with more memory (QLoRA's 4-bit weights are not sharded here)"}[config.adapter]
        raise ConfigError(
            f"adapter={config.adapter} holds about {need / 2**30:.0f} GiB of weights, gradients and optimizer state "
            f"on each GPU in {later} ({choice}), more than a GPU's {total / 2**30:.0f} GiB: {instead}")


def check_checkpoint_space(config: TrainConfig, model, choice: str, stage_dir: Path, steps: int | None) -> None:
    """Refuse, before the first step, a volume that cannot hold the stage's checkpoints and its trained model.
    A checkpoint holds the trained weights and AdamW's moments (12 bytes a trained parameter in fp32, 14 under ZeRO
    with its bf16 copy); up to save_total_limit of them stay, one more while the next is written, and fewer when
    the stage's `steps` (None: not known) make fewer saves. The trained model follows (4 bytes a parameter in fp32,
    and the next stage's bf16 copy). Only full fine-tuning's are large; a job that runs out of space at its third
    save has trained for hours."""
    trained = trainable_count(config, model)
    per_checkpoint = trained * (14 if choice in SHARDED else 12)
    saves = config.save_total_limit + 1 if steps is None else min(config.save_total_limit + 1,
                                                                   steps // config.save_steps + 1)
    kept = len(saved_checkpoints(stage_dir))  # a resumed job's are on the volume already
    needed = max(saves - kept, 1) * per_checkpoint + trained * (2 if choice in SHARDED else 4) + trained * 2
    folder = volumes_of(stage_dir)[0]
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ConfigError(
            f"not enough disk space for {stage_dir.name}: its checkpoints take about {per_checkpoint / 1e9:.0f} GB "
            f"each, up to {saves} at once (save_total_limit={config.save_total_limit}, one more while one is "
            f"written), and its trained model follows: {needed / 1e9:.0f} GB, more than {folder} has now "
            f"({free / 1e9:.0f} GB free): give the job a larger volume (launch train --volume-size GB; SageMaker's "
            "VolumeSizeInGB) or a lower save_total_limit")


def planned_steps(config: TrainConfig, stage: str, rows: int) -> int | None:
    """The optimizer steps the Trainer will take over `rows` (None for GRPO, whose batches are answers)."""
    if stage == "grpo":
        return None
    max_steps = config.max_steps if stage == "sft" else config.dpo_max_steps
    if max_steps > 0:
        return max_steps
    epochs = config.num_train_epochs if stage == "sft" else config.dpo_num_train_epochs
    batches = math.ceil(rows / (config.per_device_train_batch_size * world_size()))
    return math.ceil(epochs * math.ceil(batches / config.gradient_accumulation_steps))
