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
    lines += _instruction_lines(report.get("instructions"))
    lines += _voice_lines(report["stages"])
    lines += _sample_lines(config, report["stages"])
    metrics = {stage: values.get("metrics", {}) for stage, values in report["stages"].items()}
    lines += ["", "## Metrics", "", "```json", json.dumps(metrics, indent=2, sort_keys=True), "```",
              "", "## Hyperparameters", "", "```json",
              json.dumps(report["config"], indent=2, sort_keys=True, default=list),
              "```", "", f"Device: {report.get('device')}, precision {report.get('precision')}. Serve it with the same "
              "image (`docker run IMAGE serve`); its TGI and OpenAI routes answer.", ""]
    return "\n".join(lines)


def _instruction_lines(made: dict | None) -> list[str]:
    """instructions=auto: where the training rows came from (counts only: the rows are the person's writing)."""
    if not made:
        return []
    train, held_out = made["train"], made["held_out"]
    return ["", f"The rows were made in the job from {made['documents']} documents of the person's writing "
            f"(instructions=auto): {made['teacher_name']} wrote the instruction each passage answers "
            f"({made['engine']}); "
            f"{train['kept']} of {train['passages']} passages kept ({train['passed']} passed the checks, "
            f"instructions_keep={made['instructions_keep']}); {made['held_out_documents']} whole documents "
            f"({held_out['kept']} passages) held out for the voice."]


def _revision_lines(revision: str | None) -> list[str]:
    """The base's hub commit, resolved when the job started: the exact weights (and code) it was trained on."""
    return ["", f"Base model revision: commit `{revision}` on the Hugging Face Hub."] if revision else []


def _starts(stages: dict) -> dict[str, str]:
    """The model each stage starts from: the base for the first, the stage before for the others."""
    names = list(stages)
    return {stage: "base" if index == 0 else names[index - 1] for index, stage in enumerate(names)}


def _voice_lines(stages: dict) -> list[str]:
    """One table with a column per model (the base, then each stage) when the stages measured the same held-out
    rows (the same prompts_digest), one after the other; else a table per stage: its starting model against it."""
    voiced = [stage for stage, values in stages.items() if (values.get("voice") or {}).get("after")]
    if not voiced:
        return []
    names, starts = list(stages), _starts(stages)
    digests = {stages[stage]["voice"].get("prompts_digest") for stage in voiced}
    first = names.index(voiced[0])
    shared = None not in digests and len(digests) == 1 and voiced == names[first:first + len(voiced)]
    lines = []
    for group in [voiced] if shared or len(voiced) == 1 else [[stage] for stage in voiced]:
        voices = [stages[stage]["voice"] for stage in group]
        columns = [starts[group[0]], *group]
        measured = [voices[0]["before"], *(voice["after"] for voice in voices)]
        title = "Voice" if len(group) > 1 or len(voiced) == 1 else f"Voice ({group[0]})"
        lines += ["", f"## {title}: {', '.join(columns)}, on the person's held-out writing", "",
                  f"| measure | {' | '.join(columns)} | better |", "|" + " --- |" * (len(columns) + 2)]
        for key, label, better in VOICE_ROWS:
            lines.append(f"| {label} | {' | '.join(str(scores.get(key, '')) for scores in measured)} | {better} |")
        lines += _sampling_lines(dict(zip(group, voices)), starts)
    return lines


def _sampling_lines(voices: dict, starts: dict[str, str]) -> list[str]:
    """How the measured answers (and the sample answers) were generated: one line when every stage sampled alike."""
    said = {stage: _sampling_text(voice["sampling"]) for stage, voice in voices.items() if voice.get("sampling")}
    if not said:
        return []
    if len(set(said.values())) == 1 and len(said) == len(voices):
        return ["", f"Answers are generated as the endpoint samples: {next(iter(said.values()))}."]
    return ["", "Answers are generated as the endpoint samples:", "",
            *(f"- in {stage} ({starts[stage]} and {stage}): {text}" for stage, text in said.items())]


def _sampling_text(sampling: dict) -> str:
    if sampling.get("do_sample"):
        how = ", ".join(f"{key} {sampling[key]}" for key in ("temperature", "top_p", "top_k", "repetition_penalty")
                        if sampling.get(key) not in (None, 0))  # top_k 0: no top-k cut
    else:
        how = "greedy" + (f", repetition_penalty {sampling['repetition_penalty']}"
                          if sampling.get("repetition_penalty") else "")
    own = sampling.get("from_generation_config") or []
    source = (f"{', '.join(own)} from the model's generation_config.json, the rest the image's defaults" if own
              else "the image's defaults: the model's generation_config.json sets none")
    return (f"{how}; seed {sampling.get('seed')} before each model's answers, at most "
            f"{sampling.get('max_new_tokens')} new tokens ({source})")


def _sample_lines(config: TrainConfig, stages: dict) -> list[str]:
    """Per held-out prompt, the person's real answer and each model's in order: the base, then each stage
    (joined by prompt text: a stage with other prompts shows its starting model and itself). The person's
    writing, word for word, so none with keep_writing_private."""
    if not any((values.get("voice") or {}).get("after") or (values.get("voice") or {}).get("samples")
               for values in stages.values()):
        return []
    lines = ["", "## Sample answers", ""]
    if config.keep_writing_private:
        return lines + ["Sample answers are left out (keep_writing_private=true): the person's writing stays in the "
                        "job."]
    starts, joined = _starts(stages), {}
    for stage, values in stages.items():
        for sample in (values.get("voice") or {}).get("samples", []):
            entry = joined.setdefault(sample["prompt"], {"the person": sample["reference"]})
            for model, key in ((starts[stage], "before"), (stage, "after")):
                if key in sample:
                    entry.setdefault(model, sample[key])
    if not joined:
        return []
    lines.append("Held-out prompts, the person's real answer, and each model's answer: the base model, then "
                 "each stage in order.")
    lines.append("")
    for prompt, answers in joined.items():
        lines.append(f"- **Prompt:** {_one_line(prompt)}")
        lines += [f"  - {model}: {_one_line(answer)}" for model, answer in answers.items()]
    return lines


def _one_line(text: str, limit: int = 240) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"
