"""Merge the LoRA adapter and write the model directory (container.model_dir's format), atomically."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from container.model_dir import ServingSpec, publish
from container.opt_ml import OptML
from train.config import TrainConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_TOTAL_TOKENS = 4096


def export_merged(peft_model, tokenizer, config: TrainConfig, base_model: str, paths: OptML, training: dict) -> None:
    """Merge adapters into the base, save it in bf16 with tokenizer, chat template and serving spec to a
    staging folder, then move that into the model directory."""
    merged = peft_model.merge_and_unload().to(torch.bfloat16)
    merged.generation_config.eos_token_id = tokenizer.eos_token_id
    merged.generation_config.pad_token_id = tokenizer.pad_token_id

    max_total = int(getattr(merged.config, "max_position_embeddings", 0) or DEFAULT_MAX_TOTAL_TOKENS)
    spec = ServingSpec(
        base_model=base_model,
        max_input_tokens=max(1, max_total - config.max_new_tokens),
        max_total_tokens=max_total,
        max_new_tokens=config.max_new_tokens,
        training=training,
    )
    staging = paths.model_staging_dir
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    merged.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    spec.write(staging)
    publish(staging, paths.model_dir)
    log.info("model written to %s: %s", paths.model_dir, ", ".join(sorted(p.name for p in Path(paths.model_dir).iterdir())))
