"""How one job's processes share the work: DDP, DeepSpeed ZeRO-2/3 or FSDP (`strategy`, chosen from the model's size
when distributed=auto), the Trainer arguments each needs, the process group, and ZeRO-3's partitioned loading."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch

from train.config import TrainConfig

log = logging.getLogger(__name__)

DEEPSPEED_CONFIGS = Path(__file__).with_name("deepspeed")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def native_bf16() -> bool:
    """A GPU that computes in bf16 natively (Ampere, compute 8.0, and newer): torch's default also says yes where
    it is emulated (a T4), which trains slowly on the math attention kernel."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


SHARDED = ("zero2", "zero3", "fsdp")  # each GPU holds a share of the optimizer state, and the fp32 master copy


def strategy(config: TrainConfig, model, stage: str) -> str:
    """single, ddp, zero2, zero3 or fsdp. auto: DDP while a full replica (weights, gradients, optimizer
    state: training_bytes) fits in most of one GPU, else ZeRO-3, which shards all three across every GPU of
    every host."""
    if world_size() == 1 and config.distributed not in ("zero2", "zero3"):  # DeepSpeed runs alone when asked
        return "single"
    if config.distributed != "auto":
        return config.distributed
    if not torch.cuda.is_available():
        log.info("distributed=auto: DDP over gloo on the CPU (%d processes)", world_size())
        return "ddp"
    need = training_bytes(config, model, "ddp", stage)
    total = torch.cuda.get_device_properties(0).total_memory
    choice = "ddp" if need < 0.8 * total else "zero3"
    log.info("distributed=auto: about %.1f GiB per replica on %.1f GiB GPUs -> %s", need / 2**30, total / 2**30,
             "DDP (a replica fits one GPU)" if choice == "ddp"
             else "ZeRO-3 (shard weights, gradients and optimizer state)")
    return choice


@contextmanager
def sharded_loading(config: TrainConfig, device, output_dir: Path, source: str, planned: str):
    """The model loads partitioned under ZeRO-3 (DeepSpeed's zero.Init, which transformers uses while a
    ZeRO-3 config is alive): loaded whole, every process would hold all of it in host memory and DeepSpeed would
    put all of it on each GPU before sharding, so a model that does not fit one GPU could not train at all.
    `planned`: planned_strategy()'s choice."""
    if planned != "zero3":
        yield
        return
    import deepspeed
    from transformers import TrainingArguments

    start_processes(config)  # the process group, now,
    deepspeed.init_distributed(timeout=timedelta(seconds=config.ddp_timeout))  # and DeepSpeed's view of it
    plan = TrainingArguments(output_dir=str(output_dir), deepspeed=str(DEEPSPEED_CONFIGS / "zero3.json"),
                             per_device_train_batch_size=config.per_device_train_batch_size,
                             gradient_accumulation_steps=config.gradient_accumulation_steps, bf16=device.bf16,
                             use_cpu=device.use_cpu, ddp_timeout=config.ddp_timeout, report_to="none")
    log.info("ZeRO-3: loading %s partitioned over the %d processes", source, world_size())
    try:
        yield
    finally:
        del plan  # the stage's own config takes over


def start_processes(config: TrainConfig):
    """This job's processes as accelerate sees them, under torchrun the process group the Trainer would start
    anyway, started now, with the Trainer's timeout (ddp_timeout): the first start sets it for the job, and the
    other ranks wait in a collective while the first writes instructions. On the CPU accelerate joins them (over
    gloo) only when told it is the CPU."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=config.ddp_timeout))


def planned_strategy(config: TrainConfig, source: str, revision: str | None, stage: str) -> str:
    """strategy() before the model is loaded: auto on GPUs counts an empty (meta-device) copy of it. QLoRA is
    never loaded sharded (its 4-bit weights are frozen and placed on each process's GPU; ZeRO-3 is refused for it)."""
    if config.adapter == "qlora":
        return "unsharded"
    if config.distributed != "auto" or world_size() == 1 or not torch.cuda.is_available():
        return strategy(config, None, stage)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=config.trust_remote_code)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)
    return strategy(config, empty, stage)


def log_partition(model) -> None:
    """What of the model this process holds, when ZeRO-3 partitioned it as it loaded."""
    parts = [p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor")]
    if parts:
        log.info("ZeRO-3: rank %s holds %d of the model's %d parameters", os.environ.get("RANK", "0"), sum(parts),
                 sum(numel(p) for p in model.parameters()))


def trainable_count(config: TrainConfig, model) -> int:
    """The parameters the optimizer keeps state for: all of them in full fine-tuning; with LoRA and QLoRA the
    adapter's, r x (in + out) for each linear layer it adapts (peft's all-linear: every one but the output
    layer). Counted from the layers, not from requires_grad: before peft wraps the model every base weight
    still says it trains, which made an 8B LoRA look like 144 GB to train."""
    if config.adapter == "full":
        return sum(numel(p) for p in model.parameters())
    targets = config.lora_target_modules
    output = model.get_output_embeddings()
    count = 0
    for name, module in model.named_modules():
        if not (hasattr(module, "in_features") and hasattr(module, "out_features")) or module is output:
            continue
        if "lora_" in name or name.endswith(".base_layer"):  # a peft-wrapped layer counts once, as itself
            continue
        if targets == ("all-linear",) or any(name == t or name.endswith("." + t) for t in targets):
            count += config.lora_r * (module.in_features + module.out_features)
    return count


def training_bytes(config: TrainConfig, model, choice: str, stage: str) -> int:
    """What training holds on a GPU besides activations where that GPU holds all of it (one GPU, or DDP):
    - 16 bytes for each trained parameter: its fp32 weight (the master copy that mixed precision updates), its
      gradient and AdamW's two moments; DDP adds its gradient buckets (4), and full fine-tuning autocast's bf16
      copy of each weight, kept from the forward pass to the backward (2);
    - the frozen weights: LoRA's base, 16-bit where bf16 is on, else fp32 (counted from the parameters' number, so
      that an empty model counts as the loaded one), QLoRA's 4-bit base as loaded;
    - full fine-tuning's frozen reference (TrainConfig.reference_copy), loaded as the model is: fp32."""
    params = sum(numel(p) for p in model.parameters())
    per_trained = 16 + (4 if choice == "ddp" else 0)
    if config.adapter == "full":
        return params * (per_trained + 2) + (params * 4 if config.reference_copy(stage) else 0)
    frozen = (sum(numel(p) * p.element_size() for p in model.parameters()) if config.adapter == "qlora"
              else params * (2 if config.bf16 != "false" and native_bf16() else 4))
    return frozen + trainable_count(config, model) * per_trained


def numel(parameter) -> int:
    """A parameter's size, also when ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return getattr(parameter, "ds_numel", None) or parameter.numel()


def distributed_args(config: TrainConfig, choice: str) -> dict:
    args = {"ddp_timeout": config.ddp_timeout, "save_on_each_node": True}
    if choice in ("zero2", "zero3"):
        args["deepspeed"] = str(DEEPSPEED_CONFIGS / f"{choice}.json")
    elif choice == "fsdp":
        args.update(fsdp="full_shard auto_wrap", fsdp_config={"use_orig_params": True})
    elif choice == "ddp":
        args["ddp_find_unused_parameters"] = False
    return args
