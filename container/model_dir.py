"""The model directory format: the one description of what `train` writes and `serve` reads.

A model directory (SageMaker's /opt/ml/model, shipped as model.tar.gz) holds:

    config.json, generation_config.json   transformers model config        (weights="merged")
    *.safetensors                          merged 16-bit weights, never pickles (weights="merged")
    adapter/                               peft adapter (weights="adapter", or beside merged weights)
    tokenizer.json, tokenizer_config.json  the tokenizer
    chat_template.jinja                    the chat template used in training, used again by serve
    training_report.json                   resolved config, data counts, metrics, voice metrics, throughput
    README.md                              the model card (Hugging Face format), from the same report
    serving.json                           ServingSpec below; written last, so its presence means complete

An adapter-only directory names its base in serving.json: a hub id (with the commit SHA it was trained
on, which serve loads), or "embedded" for the image's default model. `publish` renames a finished staging
directory into place, so the model directory appears whole or not at all; into a mount point it moves the
files under a marker `serve` refuses, serving.json last.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

FORMAT_VERSION = 1
SERVING_SPEC_FILE = "serving.json"
PUBLISHING_MARKER = ".publishing"  # in a model directory while `publish` moves files into a mount point
TRAINING_REPORT_FILE = "training_report.json"
ADAPTER_DIR = "adapter"
REQUIRED_FILES = {"merged": ("config.json", "tokenizer_config.json"),
                  "adapter": ("tokenizer_config.json", f"{ADAPTER_DIR}/adapter_config.json")}

# The default base model baked into the image (prepared under .cache/ by `make model` outside it).
EMBEDDED_MODEL_ENV = "LLM_TWIN_EMBEDDED_MODEL_DIR"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_BASE = "embedded"  # how serving.json names the embedded model as an adapter's base


class ModelDirError(Exception):
    """The model directory is incomplete or not in this format."""


@dataclass(frozen=True)
class ServingSpec:
    """Serving defaults that travel with the weights, so the endpoint needs no extra configuration."""

    base_model: str  # what was fine-tuned; for weights="adapter", what to load the adapter onto
    max_input_tokens: int
    max_total_tokens: int
    max_new_tokens: int = 256
    # Wrap TGI-style raw `inputs` in the chat template as one user turn. The model was fine-tuned on
    # chat-formatted examples, so prompting it the same way is what makes its answers sound right.
    chat_template_for_inputs: bool = True
    weights: str = "merged"  # "merged": full weights at the top; "adapter": only adapter/ (+ base_model)
    has_adapter: bool = False  # adapter/ present (weights="adapter", or export=both beside merged weights)
    # The hub commit (SHA) of a hub base_model, resolved once by `train`: every endpoint instance loads exactly
    # these weights, not whatever the hub's branch holds when it starts. None: a local or the embedded base.
    base_model_revision: str | None = None
    format_version: int = FORMAT_VERSION

    def write(self, model_dir: Path) -> None:
        (model_dir / SERVING_SPEC_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, model_dir: Path) -> "ServingSpec":
        path = model_dir / SERVING_SPEC_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            spec = cls(**raw)
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ModelDirError(f"{path}: unreadable serving spec ({e})") from e
        if spec.format_version != FORMAT_VERSION:
            raise ModelDirError(
                f"{path}: format_version {spec.format_version} is not supported by this image "
                f"(expects {FORMAT_VERSION})"
            )
        return spec


def missing_files(model_dir: Path, spec: ServingSpec | None = None) -> list[str]:
    """What a loadable model directory lacks (empty when complete)."""
    if spec is None and not (model_dir / SERVING_SPEC_FILE).is_file():
        return [SERVING_SPEC_FILE]
    weights = (spec or ServingSpec.read(model_dir)).weights
    if weights not in REQUIRED_FILES:
        raise ModelDirError(f"{model_dir / SERVING_SPEC_FILE}: unknown weights {weights!r}")
    missing = [name for name in REQUIRED_FILES[weights] if not (model_dir / name).is_file()]
    if weights == "merged" and not any(model_dir.glob("*.safetensors")):
        missing.append("*.safetensors")
    if weights == "adapter" and not (model_dir / ADAPTER_DIR / "adapter_model.safetensors").is_file():
        missing.append(f"{ADAPTER_DIR}/adapter_model.safetensors")  # what vLLM loads before any pickle
    return missing


def embedded_model_dir(environ: Mapping[str, str] = os.environ) -> Path:
    default = Path(__file__).resolve().parents[1] / ".cache" / "models" / EMBEDDED_MODEL_NAME
    return Path(environ.get(EMBEDDED_MODEL_ENV) or default)


def resolve_base(reference: str) -> str:
    """Where to load an adapter's base model from: the embedded model, or a hub id / path as recorded."""
    return str(embedded_model_dir()) if reference == EMBEDDED_BASE else reference


def publish(staging_dir: Path, model_dir: Path) -> None:
    """Put a complete staging directory (a sibling of `model_dir`, on the same filesystem) in its place,
    whole or not at all.

    Normally by rename: the old `model_dir` is renamed aside, the staging directory renamed into place,
    the old one deleted; at no moment does `model_dir` hold part of a model. A mount point (as
    /opt/ml/model is under `docker run -v` and SageMaker's local mode) cannot be renamed (EBUSY, EXDEV),
    so its entries are moved instead, under a PUBLISHING_MARKER written first and removed last: `serve`
    refuses a directory that still has it, so a crash mid-way leaves nothing that looks servable."""
    missing = missing_files(staging_dir)
    if missing:
        raise ModelDirError(f"refusing to publish incomplete model from {staging_dir}: missing {', '.join(missing)}")
    aside = model_dir.with_name(model_dir.name + ".old")
    shutil.rmtree(aside, ignore_errors=True)
    try:
        if model_dir.exists():
            model_dir.rename(aside)
    except OSError:  # a mount point
        _move_into(staging_dir, model_dir)
        return
    staging_dir.rename(model_dir)
    shutil.rmtree(aside, ignore_errors=True)


def _move_into(staging_dir: Path, model_dir: Path) -> None:
    marker = model_dir / PUBLISHING_MARKER
    marker.write_text("a training job is writing this model; it is not complete\n", encoding="utf-8")
    for entry in model_dir.iterdir():
        if entry != marker:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for entry in sorted(staging_dir.iterdir(), key=lambda p: p.name == SERVING_SPEC_FILE):
        shutil.move(str(entry), str(model_dir / entry.name))
    staging_dir.rmdir()
    marker.unlink()


def _our_training_report(model_dir: Path) -> bool:
    """Whether model_dir holds a training_report.json `train` wrote (an older image's publish moved it before
    serving.json): not just any file of that name in someone's model folder."""
    try:
        report = json.loads((model_dir / TRAINING_REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"config", "stages", "base_model"} <= set(report)


def load_spec(model_dir: Path) -> ServingSpec:
    """The serving spec of a model directory, for `serve`.

    A directory without serving.json but with a transformers config.json (any Hugging Face model, e.g.
    one packed into model.tar.gz by hand) is served with TGI's semantics: raw inputs, no chat template."""
    if (model_dir / PUBLISHING_MARKER).exists() or (
            not (model_dir / SERVING_SPEC_FILE).is_file() and _our_training_report(model_dir)):
        raise ModelDirError(f"{model_dir} holds a model its training job did not finish writing (it stopped while "
                            "publishing): serve the model of a job that completed")
    if (model_dir / SERVING_SPEC_FILE).is_file():
        spec = ServingSpec.read(model_dir)
        missing = missing_files(model_dir, spec)
        if missing:
            raise ModelDirError(f"model directory {model_dir} is incomplete: missing {', '.join(missing)}")
        return spec
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        found = ", ".join(sorted(p.name for p in model_dir.iterdir())[:10]) if model_dir.is_dir() else "no such folder"
        raise ModelDirError(
            f"{model_dir} holds no model: expected the output of `train` ({SERVING_SPEC_FILE}, config.json, "
            f"*.safetensors, tokenizer) or a transformers model folder (found: {found or 'nothing'})"
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    max_total = int(config.get("max_position_embeddings") or 4096)
    return ServingSpec(
        base_model=str(model_dir),
        max_input_tokens=max(1, max_total - 256),
        max_total_tokens=max_total,
        chat_template_for_inputs=False,
    )


def kv_bytes_per_token(model_config: Mapping, element_bytes: int, shards: int = 1) -> int:
    """What one token takes in a KV cache (keys and values, every layer), from a model's config.json; with
    tensor parallelism, on each of `shards` GPUs (each keeps one KV head at least)."""
    heads = model_config.get("num_attention_heads", 32)
    kv_heads = max(1, (model_config.get("num_key_value_heads") or heads) // shards)
    head_dim = model_config.get("head_dim") or model_config.get("hidden_size", 4096) // heads
    return 2 * model_config.get("num_hidden_layers", 32) * kv_heads * head_dim * element_bytes
