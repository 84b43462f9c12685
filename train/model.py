"""Which base model to fine-tune, and loading it with its tokenizer and chat template."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

from container.opt_ml import ContractError, OptML
from train.config import TrainConfig

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ENV = "LLM_TWIN_EMBEDDED_MODEL_DIR"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_CHANNEL = "model"

# Used only when a base model has no chat template (e.g. a pretrained, non-instruct checkpoint).
# It is saved with the fine-tuned model, so serving prompts exactly as training did.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def embedded_model_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The default base model baked into the image (or prepared under .cache/ by `make model`)."""
    default = Path(__file__).resolve().parents[1] / ".cache" / "models" / EMBEDDED_MODEL_NAME
    return Path(environ.get(EMBEDDED_MODEL_ENV) or default)


def resolve_base_model(config: TrainConfig, paths: OptML) -> str:
    """model_id if given, else the `model` channel, else the embedded default model."""
    if config.model_id:
        return config.model_id
    channel = paths.channel(MODEL_CHANNEL)
    if channel.is_dir():
        if not (channel / "config.json").is_file():
            found = ", ".join(sorted(p.name for p in channel.iterdir())[:8]) or "nothing"
            raise ContractError(f"the '{MODEL_CHANNEL}' channel {channel} holds no model folder: no config.json (found: {found})")
        return str(channel)
    embedded = embedded_model_dir()
    if not (embedded / "config.json").is_file():
        raise ContractError(
            f"no base model: model_id is not set, there is no '{MODEL_CHANNEL}' channel, and the embedded model "
            f"is missing at {embedded} (run `make model`, or set {EMBEDDED_MODEL_ENV})"
        )
    return str(embedded)


def load_base_model(source: str, config: TrainConfig, dtype):
    """The base model and its tokenizer. Weights load from safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = {"revision": config.model_revision or None, "trust_remote_code": config.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    if not tokenizer.chat_template:
        log.info("base model %s has no chat template: using a ChatML template, saved with the model", source)
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **hub)
    return model, tokenizer
