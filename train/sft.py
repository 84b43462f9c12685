"""Supervised fine-tuning with TRL's SFTTrainer and a peft LoRA adapter, loss on the response only.

Imports torch and TRL: `train.__main__` imports this module only after config and data are checked,
so those errors surface in a second, not after the framework has loaded.
"""

from __future__ import annotations

import logging

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from container.config import ConfigError
from train.config import TrainConfig

log = logging.getLogger(__name__)


def device_settings(config: TrainConfig) -> dict:
    """Where and in which precision to train: bf16 on GPUs that support it, fp32 on the CPU."""
    cuda = torch.cuda.is_available()
    bf16_supported = cuda and torch.cuda.is_bf16_supported()
    if config.bf16 == "true" and not bf16_supported:
        raise ConfigError("hyperparameter bf16=true needs a GPU with bfloat16 support (Ampere or newer); use bf16=auto")
    bf16 = bf16_supported if config.bf16 == "auto" else config.bf16 == "true"
    return {"use_cpu": not cuda, "bf16": bf16, "dtype": torch.bfloat16 if bf16 else torch.float32}


def train_sft(config: TrainConfig, model, tokenizer, rows: list[dict], output_dir: str, use_cpu: bool, bf16: bool):
    """Train LoRA adapters on `rows` (TRL conversational prompt/completion) and return the peft model."""
    targets = config.lora_target_modules
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear" if targets == ("all-linear",) else list(targets),
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=output_dir,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        gradient_checkpointing=config.gradient_checkpointing,  # TRL's name; its default (on) is off here
        bf16=bf16,
        use_cpu=use_cpu,
        seed=config.seed,
        logging_steps=config.logging_steps,
        completion_only_loss=True,
        packing=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[MetricsLogCallback()],
    )
    trainer.remove_callback(PrinterCallback)  # MetricsLogCallback prints the same numbers, regex-friendly
    result = trainer.train()
    log.info("training done: %d steps, train_loss=%.4f", result.global_step, result.training_loss)
    return trainer.model, result


class MetricsLogCallback(TrainerCallback):
    """One regex-friendly line per logging step: `step=10 loss=1.2340 learning_rate=2e-04 ...`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        fields = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
        print(f"step={state.global_step} {fields}", flush=True)
