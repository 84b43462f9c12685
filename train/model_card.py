"""The model card: README.md in the model directory, in the Hugging Face model-card format (a YAML header,
then Markdown), written from the training report. training_report.json keeps the same facts for machines."""

from __future__ import annotations

import json
import re
from pathlib import Path

from container.model_dir import EMBEDDED_BASE
from train.config import TrainConfig

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded model's name on the Hub

VOICE_ROWS = (("perplexity", "perplexity of the person's held-out answers", "lower"),
              ("voice_style_distance", "style distance (function words, punctuation)", "lower"),
              ("voice_overlap", "word overlap with the real answers (unigram F1)", "higher"),
              ("voice_length_ratio", "answer length / the person's", "near 1"),
              ("voice_distinct2", "distinct word pairs", "higher"))


def base_license(base_source: str) -> str | None:
    """The base model's license, from its own card's YAML header when it has one."""
    card = Path(base_source) / "README.md"
    if card.is_file():
        header = card.read_text(encoding="utf-8", errors="replace").split("---")
        if len(header) > 2:
            match = re.search(r"^license:\s*(\S+)", header[1], re.MULTILINE)
            if match:
                return match.group(1).strip("'\"")
    return None


def model_card(config: TrainConfig, report: dict, base_name: str, base_source: str, weights: str) -> str:
    """base_name: how the base is known (a hub id, "embedded", or a local path). The header names a base
    and a license only when they are known: a hub id, and the license the base's own card states."""
    tags = ["llm-twin", "sagemaker", *config.stages, "trl", config.adapter]
    hub_id = EMBEDDED_HUB_ID if base_name == EMBEDDED_BASE else base_name
    header = {"library_name": "peft" if weights == "adapter" else "transformers", "tags": tags,
              "pipeline_tag": "text-generation"}
    if not Path(hub_id).is_absolute() and not Path(hub_id).exists():  # a hub id, not a folder on this machine
        header["base_model"] = hub_id
    license = base_license(base_source)
    if license:
        header["license"] = license
    lines = ["---"]
    for key, value in header.items():
        lines.append(f"{key}:" if isinstance(value, list) else f"{key}: {json.dumps(value)}")
        if isinstance(value, list):
            lines += [f"- {json.dumps(item)}" for item in value]
    lines += ["---", "", f"# LLM Twin fine-tuned from {hub_id}", "",
              f"Trained with {' then '.join(s.upper() for s in config.stages)} ({config.adapter}) by the llm-twin "
              "SageMaker image; exported as "
              f"{'an adapter on its base' if weights == 'adapter' else 'merged 16-bit weights'}.",
              *_revision_lines(report.get("base_model_revision")),
              "", "## Data", "", "| stage | training examples | held-out examples | steps | resumed from step |",
              "| --- | --- | --- | --- | --- |"]
    for stage, values in report["stages"].items():
        lines.append(f"| {stage} | {values.get('examples', '')} | {values.get('eval_examples', '')} | "
                     f"{values.get('steps', '')} | {values.get('resumed_from_step', '')} |")
    for stage, values in report["stages"].items():
        voice = values.get("voice")
        if not voice or not voice.get("after"):
            continue
        lines += ["", f"## Voice ({stage}): the base against the twin, on the person's held-out writing", "",
                  "| measure | before | after | better |", "| --- | --- | --- | --- |"]
        for key, label, better in VOICE_ROWS:
            before, after = voice["before"].get(key, ""), voice["after"].get(key, "")
            lines.append(f"| {label} | {before} | {after} | {better} |")
        lines += _sample_lines(config, voice.get("samples", []))
    metrics = {stage: values.get("metrics", {}) for stage, values in report["stages"].items()}
    lines += ["", "## Metrics", "", "```json", json.dumps(metrics, indent=2, sort_keys=True), "```",
              "", "## Hyperparameters", "", "```json",
              json.dumps(report["config"], indent=2, sort_keys=True, default=list),
              "```", "", f"Device: {report.get('device')}, precision {report.get('precision')}. Serve it with the same "
              "image (`docker run IMAGE serve`); its TGI and OpenAI routes answer.", ""]
    return "\n".join(lines)


def _revision_lines(revision: str | None) -> list[str]:
    """The base's hub commit, resolved when the job started: the exact weights (and code) it was trained on."""
    return ["", f"Base model revision: commit `{revision}` on the Hugging Face Hub."] if revision else []


def _sample_lines(config: TrainConfig, samples: list[dict]) -> list[str]:
    """A few held-out prompts, the person's real answer and both models' answers: the person's writing, word for
    word, so none with keep_writing_private."""
    if config.keep_writing_private:
        return ["", "Sample answers are left out (keep_writing_private=true): the person's writing stays in the job."]
    lines = ["", "Sample answers to held-out prompts:", ""] if samples else []
    for sample in samples:
        lines += [f"- **Prompt:** {_one_line(sample['prompt'])}",
                  f"  - the person: {_one_line(sample['reference'])}",
                  f"  - base model: {_one_line(sample.get('before', ''))}",
                  f"  - twin: {_one_line(sample.get('after', ''))}"]
    return lines


def _one_line(text: str, limit: int = 240) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"
