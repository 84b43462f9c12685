"""The training job's configuration: one frozen dataclass, built strictly from hyperparameters.json.

Field names follow TRL/transformers arguments wherever one exists. Defaults follow the LLM Twin recipe
(LoRA r=32, alpha=32, dropout 0 on all linear layers) with TRL's recommended LoRA learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from container.config import ConfigError, describe, from_strings


def _f(default, help: str, choices: tuple | None = None):
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    model_id: str = _f("", "Hub id or local path of the base model. Empty: the `model` channel, else the embedded SmolLM2-135M-Instruct.")
    model_revision: str = _f("", "Hub revision (branch, tag or commit) of model_id.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub. Off unless you trust the repository.")
    method: str = _f("sft", "Fine-tuning method.", choices=("sft",))
    adapter: str = _f("lora", "What is trained: LoRA adapters, merged into the base at the end.", choices=("lora",))
    lora_r: int = _f(32, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    lora_target_modules: tuple[str, ...] = _f(("all-linear",), "Modules that get LoRA adapters; all-linear = every linear layer but the head.")
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    lr_scheduler_type: str = _f("linear", "Learning-rate schedule.", choices=("linear", "cosine", "constant", "constant_with_warmup"))
    warmup_steps: int = _f(10, "Linear warmup steps.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    num_train_epochs: float = _f(3.0, "Epochs over the training data (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Stop after this many optimizer steps; -1 means use num_train_epochs.")
    per_device_train_batch_size: int = _f(2, "Examples per device per forward pass.")
    gradient_accumulation_steps: int = _f(8, "Forward passes per optimizer step.")
    max_length: int = _f(2048, "Longest tokenized example (prompt + response); longer ones are truncated.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory, at about 30% more compute.")
    bf16: str = _f("auto", "bfloat16 mixed precision: auto = on GPUs that support it.", choices=("auto", "true", "false"))
    logging_steps: int = _f(1, "Log metrics every this many optimizer steps.")
    seed: int = _f(42, "Random seed for data order and LoRA initialisation.")
    max_new_tokens: int = _f(256, "Default max_new_tokens written to the model's serving defaults.")

    def __post_init__(self):
        positive = ("lora_r", "lora_alpha", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "max_length", "logging_steps", "max_new_tokens")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"hyperparameter {name}={getattr(self, name)} must be greater than 0")
        if self.learning_rate <= 0:
            raise ConfigError(f"hyperparameter learning_rate={self.learning_rate} must be greater than 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"hyperparameter lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.max_steps <= 0 and self.max_steps != -1:
            raise ConfigError(f"hyperparameter max_steps={self.max_steps} must be positive, or -1 to use num_train_epochs")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ConfigError(f"hyperparameter num_train_epochs={self.num_train_epochs} must be greater than 0")
        if not self.lora_target_modules:
            raise ConfigError("hyperparameter lora_target_modules is empty: name modules or use all-linear")

    @classmethod
    def from_hyperparameters(cls, raw: Mapping[str, str]) -> "TrainConfig":
        return from_strings(cls, raw, "hyperparameter")


def hyperparameter_table() -> str:
    """The README's hyperparameter table, generated from TrainConfig (tests check the README matches)."""
    lines = ["| name | type | default | meaning |", "| --- | --- | --- | --- |"]
    for row in describe(TrainConfig):
        default = row["default"]
        if isinstance(default, tuple):
            default = ",".join(default)
        default = f"`{default}`" if default != "" else "(empty)"
        meaning = row["help"]
        if row["choices"]:
            meaning += " One of: " + ", ".join(f"`{c}`" for c in row["choices"]) + "."
        lines.append(f"| `{row['name']}` | {row['type']} | {default} | {meaning} |")
    return "\n".join(lines)
