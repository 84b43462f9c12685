"""The model directory format: the one description of what `train` writes and `serve` reads.

A model directory (SageMaker's /opt/ml/model, shipped as model.tar.gz) holds:

    config.json, generation_config.json   transformers model config
    *.safetensors                          merged 16-bit weights (never pickles)
    tokenizer.json, tokenizer_config.json  the tokenizer
    chat_template.jinja                    the chat template used in training, used again by serve
    serving.json                           ServingSpec below; written last, so its presence means complete

`publish` moves a finished staging directory into place with serving.json last: a crash mid-way leaves
no serving.json, and `serve` refuses a directory without one unless it is a plain transformers model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
SERVING_SPEC_FILE = "serving.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
REQUIRED_FILES = ("config.json", "tokenizer_config.json")


class ModelDirError(Exception):
    """The model directory is incomplete or not in this format."""


@dataclass(frozen=True)
class ServingSpec:
    """Serving defaults that travel with the weights, so the endpoint needs no extra configuration."""

    base_model: str
    max_input_tokens: int
    max_total_tokens: int
    max_new_tokens: int = 256
    # Wrap TGI-style raw `inputs` in the chat template as one user turn. The model was fine-tuned on
    # chat-formatted examples, so prompting it the same way is what makes its answers sound right.
    chat_template_for_inputs: bool = True
    format_version: int = FORMAT_VERSION
    training: dict = field(default_factory=dict)

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
                f"{path}: format_version {spec.format_version} is not supported by this image (expects {FORMAT_VERSION})"
            )
        return spec


def missing_files(model_dir: Path) -> list[str]:
    """What a loadable model directory lacks (empty when complete)."""
    if not model_dir.is_dir():
        return [str(model_dir)]
    missing = [name for name in (*REQUIRED_FILES, SERVING_SPEC_FILE) if not (model_dir / name).is_file()]
    if not any(model_dir.glob("*.safetensors")):
        missing.append("*.safetensors")
    return missing


def publish(staging_dir: Path, model_dir: Path) -> None:
    """Move a complete staging directory's files into `model_dir`, serving.json last.

    `model_dir` itself may be a mount point (it is on SageMaker), so its entries move, not the folder.
    Whatever `model_dir` held before is removed first: it is this job's output folder."""
    missing = missing_files(staging_dir)
    if missing:
        raise ModelDirError(f"refusing to publish incomplete model from {staging_dir}: missing {', '.join(missing)}")
    model_dir.mkdir(parents=True, exist_ok=True)
    clear(model_dir)
    entries = sorted(staging_dir.iterdir(), key=lambda p: p.name == SERVING_SPEC_FILE)
    for entry in entries:
        shutil.move(str(entry), str(model_dir / entry.name))
    staging_dir.rmdir()


def clear(directory: Path) -> None:
    """Empty a directory without removing it."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def load_spec(model_dir: Path) -> ServingSpec:
    """The serving spec of a model directory, for `serve`.

    A directory without serving.json but with a transformers config.json (any Hugging Face model, e.g.
    one packed into model.tar.gz by hand) is served with TGI's semantics: raw inputs, no chat template."""
    if (model_dir / SERVING_SPEC_FILE).is_file():
        missing = missing_files(model_dir)
        if missing:
            raise ModelDirError(f"model directory {model_dir} is incomplete: missing {', '.join(missing)}")
        return ServingSpec.read(model_dir)
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
