"""Write the model directory (container.model_dir's format) atomically: merged 16-bit weights, the
adapter, or both; tokenizer and chat template; serving defaults; training_report.json; the model card.
A volume too small for it fails the job before the export's time is spent, with nothing written."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig

from container.config import ConfigError
from container.model_dir import ADAPTER_DIR, TRAINING_REPORT_FILE, ServingSpec, publish
from container.opt_ml import OptML
from train.config import TrainConfig
from train.model import BaseModel, context_length, load_trained
from train.model_card import model_card

log = logging.getLogger(__name__)

MODEL_CARD_FILE = "README.md"
EXPORT_SLACK_BYTES = 64 * 2**20  # the tokenizer, chat template, report and card, beside the weights

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export_model(config: TrainConfig, paths: OptML, tokenizer, base: BaseModel, source: str,
                 trained: Path, report: dict, extras: dict[str, Path] | None = None) -> None:
    """`trained` holds what the last stage trained on `source` (the base, or the SFT stage's model):
    the full model for adapter=full, otherwise the adapter. `extras`: files shipped with it (by name)."""
    revision = base.revision_of(source)
    model_config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=config.trust_remote_code)
    staging = paths.model_staging_dir
    shutil.rmtree(staging, ignore_errors=True)  # an earlier, stopped export's files: their space is free again
    check_free_space(paths, export_bytes(config, model_config, trained, extras or {}))
    staging.mkdir(parents=True)

    if config.export in ("merged", "both"):
        merged = load_trained(source, trained, config, revision).to(torch.bfloat16)
        merged.generation_config.eos_token_id = tokenizer.eos_token_id
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
        merged.save_pretrained(staging)
    if config.export in ("adapter", "both"):  # the adapter's weights and config only: no pickled trainer state
        (staging / ADAPTER_DIR).mkdir()
        for name in ADAPTER_FILES:
            shutil.copy2(trained / name, staging / ADAPTER_DIR / name)
    tokenizer.save_pretrained(staging)
    for name, path in (extras or {}).items():
        shutil.copy2(path, staging / name)

    max_total = context_length(model_config)
    weights = "adapter" if config.export == "adapter" else "merged"
    ServingSpec(
        base_model=base.reference if weights == "adapter" else (base.reference or base.source),
        max_input_tokens=max(1, max_total - config.max_new_tokens),
        max_total_tokens=max_total,
        max_new_tokens=config.max_new_tokens,
        weights=weights,
        has_adapter=config.export in ("adapter", "both"),
        base_model_revision=base.revision,
    ).write(staging)
    report["export"] = {"weights": weights, "adapter": config.export in ("adapter", "both")}
    (staging / TRAINING_REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
    (staging / MODEL_CARD_FILE).write_text(
        model_card(config, report, base.reference or base.source, base.source, weights), encoding="utf-8")
    publish(staging, paths.model_dir)
    log.info("model written to %s: %s", paths.model_dir, ", ".join(sorted(p.name for p in paths.model_dir.iterdir())))


def export_bytes(config: TrainConfig, model_config, trained: Path, extras: dict[str, Path]) -> int:
    """About what the export writes: merged bf16 weights (2 bytes a parameter), the adapter's files, the
    extras, and EXPORT_SLACK_BYTES for the rest."""
    total = EXPORT_SLACK_BYTES + sum(path.stat().st_size for path in extras.values())
    if config.export in ("merged", "both"):
        total += 2 * parameter_count(model_config, config.trust_remote_code)
    if config.export in ("adapter", "both"):
        total += sum((trained / name).stat().st_size for name in ADAPTER_FILES)
    return total


def parameter_count(model_config, trust_remote_code: bool) -> int:
    """The model's parameters (tied ones once, as saved), counted on the meta device: nothing is allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    return sum(parameter.numel() for parameter in model.parameters())


def check_free_space(paths: OptML, needed: int) -> None:
    """Refuse a volume that cannot hold the model. It is written to the staging folder, then moved into the
    model directory: renamed on one filesystem, copied when the model directory is a mount of another."""
    for folder in volumes_of(paths.model_staging_dir, paths.model_dir):
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise ConfigError(
                f"not enough disk space to export the model: it needs about {_gb(needed)} and {folder} has "
                f"{_gb(free)} free ({_gb(needed - free)} short); give the training job a larger storage volume "
                "(SageMaker ResourceConfig.VolumeSizeInGB: launch/api.py's volume_gb)")


def volumes_of(*paths: Path) -> list[Path]:
    """The nearest existing folder of each path, one per filesystem."""
    by_device: dict[int, Path] = {}
    for path in paths:
        while not path.exists():
            path = path.parent
        by_device.setdefault(os.stat(path).st_dev, path)
    return list(by_device.values())


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB"
