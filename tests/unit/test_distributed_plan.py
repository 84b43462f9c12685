"""The training plan: what a LoRA job trains is counted as peft will make it, before peft wraps the model (while
every base weight still says requires_grad); the dtype the weights load in, and what that means for the updates;
the GPU memory that gradient checkpointing is decided from. A GPU is faked where the plan asks for one."""

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from train.config import TrainConfig
from train.distributed import trainable_count, training_bytes
from train.model import load_for_training
from container.config import ConfigError
from train.plan import Device, check_checkpoint_space, check_fits, use_gradient_checkpointing, weights_dtype

A_BF16_GPU = Device(use_cpu=False, bf16=True, dtype=torch.bfloat16, attn_implementation=None, liger=False)


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
def test_a_lora_jobs_trainable_parameters_are_the_adapters_as_peft_counts_them(tiny_model, targets):
    config = TrainConfig(lora_r=8, lora_target_modules=tuple(targets.split(",")))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    counted = trainable_count(config, model)
    assert counted < sum(p.numel() for p in model.parameters() if p.requires_grad)  # not every base weight
    lora = LoraConfig(r=8, target_modules="all-linear" if targets == "all-linear" else targets.split(","))
    wrapped = get_peft_model(model, lora)
    assert counted == wrapped.get_nb_trainable_parameters()[0]
    assert trainable_count(config, wrapped) == counted  # and the same once wrapped
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert trainable_count(TrainConfig(adapter="full"), base) == sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("adapter", ["full", "lora", "qlora"])
@pytest.mark.parametrize("planned", ["single", "ddp", "fsdp", "zero2", "zero3", "unsharded"])
def test_only_full_fine_tuning_outside_deepspeed_keeps_fp32_weights_on_a_bf16_gpu(adapter, planned):
    chosen = weights_dtype(TrainConfig(adapter=adapter), A_BF16_GPU, planned)
    master_copy_is_ours = adapter == "full" and planned not in ("zero2", "zero3", "fsdp")  # sharding keeps one
    assert chosen == (torch.float32 if master_copy_is_ours else torch.bfloat16)
    cpu = Device(use_cpu=True, bf16=False, dtype=torch.float32, attn_implementation=None, liger=False)
    assert weights_dtype(TrainConfig(adapter=adapter), cpu, planned) == torch.float32


def moved_by_adamw(model, steps: int, learning_rate: float) -> float:
    """The share of the model's weights that `steps` AdamW steps change, computing in bf16 under autocast as the
    Trainer does with bf16 on."""
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    vocab = model.config.vocab_size
    ids = (torch.arange(4 * -(-vocab // 4)) % vocab).reshape(4, -1)  # every token, so every embedding row learns
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = sum((p.detach() != b).sum().item() for p, b in zip(model.parameters(), before))
    return moved / sum(b.numel() for b in before)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_full_fine_tuning_in_the_chosen_dtype_updates_every_weight_where_bf16_weights_lose_most_steps(
        tiny_model, stage):
    config = TrainConfig(adapter="full")
    learning_rate = config.stage_learning_rate(stage)  # full fine-tuning's: 2e-5 for SFT, 5e-7 for DPO
    chosen = load_for_training(str(tiny_model), config, weights_dtype(config, A_BF16_GPU, "single"), None)
    assert moved_by_adamw(chosen, 3, learning_rate) > 0.99
    in_bf16 = load_for_training(str(tiny_model), config, torch.bfloat16, None)
    assert moved_by_adamw(in_bf16, 3, learning_rate) < 0.5  # why: most of these steps round away in bf16


def test_gradient_checkpointing_counts_what_training_holds_on_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    gpu = {}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=gpu["bytes"]))
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.empty(1 << 30, device="meta"))  # 1B parameters in fp32
    model.get_output_embeddings = lambda: None
    full = TrainConfig(adapter="full")
    # fp32 weights, gradients, two AdamW moments (16) and autocast's bf16 copies (2); DDP's buckets (4); DPO's
    # frozen reference, a copy as loaded (4); ORPO needs none
    assert training_bytes(full, model, "single", "sft") == 18 << 30
    assert training_bytes(full, model, "ddp", "sft") == 22 << 30
    assert training_bytes(full, model, "single", "dpo") == training_bytes(full, model, "single", "kto") == 22 << 30
    assert training_bytes(full, model, "single", "orpo") == 18 << 30
    gpu["bytes"] = 40 << 30
    assert use_gradient_checkpointing(full, model, "single", "sft") is False  # 18 GiB of 40: under half
    assert use_gradient_checkpointing(full, model, "single", "dpo") is True  # 22: over
    gpu["bytes"] = 24 << 30
    assert use_gradient_checkpointing(full, model, "single", "sft") is True
    assert training_bytes(TrainConfig(), model, "single", "dpo") == 2 << 30  # LoRA: the 16-bit base, no layers here
    assert use_gradient_checkpointing(TrainConfig(), model, "single", "sft") is False


def test_a_job_whose_optimizer_state_cannot_fit_a_gpu_is_refused_before_it_starts(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=80 << 30))
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.empty(8 << 30, device="meta"))  # an 8B model
    model.get_output_embeddings = lambda: None
    full = TrainConfig(adapter="full")
    with pytest.raises(ConfigError, match=r"adapter=full holds about 144 GiB .* in sft \(single\), more than a GPU's "
                                          r"80 GiB: use adapter=lora or adapter=qlora, or shard it with distributed"):
        check_fits(full, model, "sft")
    check_fits(TrainConfig(), model, "dpo")  # LoRA: the 16-bit base (16 GiB) and the adapter fit
    monkeypatch.setenv("WORLD_SIZE", "8")
    check_fits(TrainConfig(adapter="full", distributed="zero3"), model, "sft")  # sharded: the plan's own business
    with pytest.raises(ConfigError, match=r"about 176 GiB .* in sft \(ddp\)"):
        check_fits(TrainConfig(adapter="full", distributed="ddp"), model, "sft")
    small = torch.nn.Module()
    small.weight = torch.nn.Parameter(torch.empty(4 << 30, device="meta"))  # 4B: SFT's 72 GiB fits, DPO's 88 not
    small.get_output_embeddings = lambda: None
    monkeypatch.setenv("WORLD_SIZE", "1")
    sft_dpo = TrainConfig(adapter="full", method="sft+dpo")
    with pytest.raises(ConfigError, match=r"about 88 GiB .* in dpo \(single\)"):
        check_fits(sft_dpo, small, "sft")  # refused before SFT trains, not after
    with pytest.raises(ConfigError, match=r"use adapter=qlora, or shard it"):  # LoRA is not told to use LoRA
        check_fits(TrainConfig(), Weights(40 << 30), "sft")


class Weights(torch.nn.Module):
    """`count` frozen parameters and one 4096 x 4096 linear layer for LoRA to adapt, on the meta device."""

    def __init__(self, count: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(count, device="meta"))
        self.q_proj = torch.nn.Linear(4096, 4096, bias=False, device="meta")

    def get_output_embeddings(self):
        return None


def test_a_volume_that_cannot_hold_the_checkpoints_is_refused_before_the_first_step(monkeypatch, tmp_path):
    model = Weights(3 * 10**9)  # a 3B model: 36 GB a checkpoint in full fine-tuning
    free = {"bytes": 100 * 10**9}
    monkeypatch.setattr("train.plan.shutil.disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    full, stage_dir = TrainConfig(adapter="full"), tmp_path / "checkpoints" / "sft"
    with pytest.raises(ConfigError, match=r"not enough disk space for sft: its checkpoints take about 36 GB each, up "
                                          r"to 3 at once \(save_total_limit=2, one more while one is written\), and "
                                          r"its trained model follows: 127 GB, more than .* \(100 GB free\): give "
                                          r"the job a larger volume \(launch train --volume-size GB"):
        check_checkpoint_space(full, model, "single", stage_dir, None)
    check_checkpoint_space(full, model, "single", stage_dir, 60)  # 60 steps: one save (every 50), one at a stop
    check_checkpoint_space(TrainConfig(adapter="full", save_total_limit=1), model, "single", stage_dir, None)  # 90 GB
    check_checkpoint_space(TrainConfig(), model, "single", stage_dir, None)  # LoRA's hold the adapter only (q_proj)
    for step in (10, 20):  # a resumed job's checkpoints are already on the volume
        (stage_dir / f"checkpoint-{step}").mkdir(parents=True)
    free["bytes"] = 60 * 10**9
    check_checkpoint_space(full, model, "single", stage_dir, None)  # one more at a time: 36 GB, and 18 after
