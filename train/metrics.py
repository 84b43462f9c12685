"""Training metrics: one regex-friendly log line per logging step, and the SageMaker MetricDefinitions
that read them (the launcher passes these to CreateTrainingJob). No torch import here.

    stage=sft step=10 train_loss=1.234 learning_rate=0.0002 grad_norm=0.5 tokens_per_second=812.3 epoch=0.5
    stage=sft step=40 eval_loss=1.101
    stage=sft step=40 voice_length_ratio=0.93 voice_distinct2=0.88 voice_style_distance=0.21 voice_overlap=0.31 perplexity=3.01
"""

from __future__ import annotations

import time

_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"

METRIC_DEFINITIONS = [
    {"Name": "train:loss", "Regex": rf"stage=\S+ step=\d+ train_loss={_NUMBER}"},
    {"Name": "eval:loss", "Regex": rf"eval_loss={_NUMBER}"},
    {"Name": "train:learning_rate", "Regex": rf" learning_rate={_NUMBER}"},
    {"Name": "train:grad_norm", "Regex": rf" grad_norm={_NUMBER}"},
    {"Name": "train:tokens_per_second", "Regex": rf" tokens_per_second={_NUMBER}"},
    {"Name": "train:epoch", "Regex": rf" epoch={_NUMBER}"},
    {"Name": "dpo:rewards_accuracies", "Regex": rf" rewards_accuracies={_NUMBER}"},
    {"Name": "dpo:rewards_margins", "Regex": rf" rewards_margins={_NUMBER}"},
    {"Name": "voice:length_ratio", "Regex": rf" voice_length_ratio={_NUMBER}"},
    {"Name": "voice:distinct2", "Regex": rf" voice_distinct2={_NUMBER}"},
    {"Name": "voice:style_distance", "Regex": rf" voice_style_distance={_NUMBER}"},
    {"Name": "voice:overlap", "Regex": rf" voice_overlap={_NUMBER}"},
    {"Name": "eval:perplexity", "Regex": rf" perplexity={_NUMBER}"},
]


def log_fields(logs: dict) -> dict:
    """Trainer logs → the fields a log line carries: TRL's `loss` becomes `train_loss`, and `/` in DPO's
    keys (rewards/chosen) becomes `_`, so every value is one `key=number` token."""
    if "train_runtime" in logs:  # the end-of-training summary: averages, not a step's values
        logs = {("mean_train_loss" if k == "train_loss" else k): v for k, v in logs.items()}
    return {("train_loss" if key == "loss" else key.replace("/", "_")): value for key, value in logs.items()}


def format_log_line(stage: str, step: int, logs: dict) -> str:
    """`stage=... step=... key=value ...`, one token per field (see log_fields)."""
    fields = [f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}"
              for key, value in log_fields(logs).items()]
    return f"stage={stage} step={step} " + " ".join(fields)


def metric_name(field: str) -> str:
    """A log line's field → the name trackers show it under: train/loss, eval/loss, voice/overlap."""
    if field.startswith("voice_"):
        return "voice/" + field[len("voice_"):]
    if field.startswith("eval_"):
        return "eval/" + field[len("eval_"):]
    if field == "perplexity":
        return "eval/perplexity"
    return "train/" + (field[len("train_"):] if field.startswith("train_") else field)


class TokenRate:
    """Real (non-padding) tokens per second between two log calls, from TRL's running `num_tokens`."""

    def __init__(self):
        self._last = None

    def update(self, num_tokens: float | None) -> float | None:
        now = time.monotonic()
        rate = None
        if num_tokens is not None and self._last is not None and now > self._last[0]:
            rate = (num_tokens - self._last[1]) / (now - self._last[0])
        if num_tokens is not None:
            self._last = (now, num_tokens)
        return rate
