"""Write the model directory (container.model_dir's format) atomically: merged 16-bit weights, the
adapter, or both; tokenizer and chat template; serving defaults; training_report.json; the model card."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig

from container.model_dir import ADAPTER_DIR, TRAINING_REPORT_FILE, ServingSpec, publish
from container.opt_ml import OptML
from train.config import TrainConfig
from train.model import BaseModel, load_trained
from train.model_card import model_card

log = logging.getLogger(__name__)

DEFAULT_MAX_TOTAL_TOKENS = 4096
MODEL_CARD_FILE = "README.md"


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export_model(config: TrainConfig, paths: OptML, tokenizer, base: BaseModel, source: str,
                 trained: Path, report: dict, extras: dict[str, Path] | None = None) -> None:
    """`trained` holds what the last stage trained on `source` (the base, or the SFT stage's model):
    the full model for adapter=full, otherwise the adapter. `extras`: files shipped with it (by name)."""
    staging = paths.model_staging_dir
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    if config.export in ("merged", "both"):
        merged = load_trained(source, trained, config).to(torch.bfloat16)
        merged.generation_config.eos_token_id = tokenizer.eos_token_id
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
        merged.save_pretrained(staging)
        model_config = merged.config
    else:
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    if config.export in ("adapter", "both"):  # the adapter's weights and config only: no pickled trainer state
        (staging / ADAPTER_DIR).mkdir()
        for name in ADAPTER_FILES:
            shutil.copy2(trained / name, staging / ADAPTER_DIR / name)
    tokenizer.save_pretrained(staging)
    for name, path in (extras or {}).items():
        shutil.copy2(path, staging / name)

    max_total = int(getattr(model_config, "max_position_embeddings", 0) or DEFAULT_MAX_TOTAL_TOKENS)
    weights = "adapter" if config.export == "adapter" else "merged"
    ServingSpec(
        base_model=base.reference if weights == "adapter" else (base.reference or base.source),
        max_input_tokens=max(1, max_total - config.max_new_tokens),
        max_total_tokens=max_total,
        max_new_tokens=config.max_new_tokens,
        weights=weights,
        has_adapter=config.export in ("adapter", "both"),
    ).write(staging)
    report["export"] = {"weights": weights, "adapter": config.export in ("adapter", "both")}
    (staging / TRAINING_REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
    (staging / MODEL_CARD_FILE).write_text(
        model_card(config, report, base.reference or base.source, base.source, weights), encoding="utf-8")
    publish(staging, paths.model_dir)
    log.info("model written to %s: %s", paths.model_dir, ", ".join(sorted(p.name for p in paths.model_dir.iterdir())))
