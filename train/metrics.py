"""Training metrics: one regex-friendly log line per logging step, which container/metrics.py's SageMaker
MetricDefinitions read (the launcher passes these to CreateTrainingJob). No torch import here.

    stage=sft step=10 train_loss=1.234 learning_rate=0.0002 grad_norm=0.5 tokens_per_second=812.3 epoch=0.5
    stage=sft step=40 eval_loss=1.101
    stage=sft step=40 voice_length_ratio=0.93 voice_distinct2=0.88 voice_style_distance=0.21 voice_overlap=0.31 perplexity=3.01
"""  # noqa: E501 (the example log line is one line)

from __future__ import annotations

import time


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
