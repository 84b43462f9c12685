"""Where `serve` finds its model: /opt/ml/model, or HF_MODEL_ID as TGI's SageMaker entrypoint takes it.

A model directory in /opt/ml/model (the endpoint's ModelDataUrl) always wins. When it holds none (it is
empty, or holds only what is not a model, such as the SDK local mode's own copy of a tarball), HF_MODEL_ID
names the model the way the LLM Twin book and every TGI/DLC deployment do: a local folder, or
a Hugging Face Hub id downloaded once, before the workers start, into HF_HOME (on the endpoint's storage
volume: see container/entrypoint.py), at HF_MODEL_REVISION, with HF_TOKEN or HUGGING_FACE_HUB_TOKEN for
gated models. Only safetensors weights are fetched; the token is never printed. The commit downloaded is
printed: without HF_MODEL_REVISION, each instance takes the hub's `main` as it is when the instance starts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from container.config import ConfigError
from container.model_dir import SERVING_SPEC_FILE
from serve.config import ServeConfig

# What serving needs from a hub repository: configs, safetensors weights, the tokenizer, a chat template.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")  # snapshot_download's folder is named after the commit it holds


def model_source(config: ServeConfig) -> Path:
    """The folder to serve: config.model_dir unless it holds no model and HF_MODEL_ID is set."""
    if _holds_a_model(config.model_dir) or not config.hf_model_id:
        return config.model_dir
    local = Path(config.hf_model_id)
    if local.is_dir():
        return local
    if config.hf_model_id.startswith(("/", ".", "~")):
        raise ConfigError(f"HF_MODEL_ID={config.hf_model_id!r} is not a folder (and {config.model_dir} holds no model)")
    return _download(config.hf_model_id, config.hf_model_revision or None, config.trust_remote_code)


def _download(repo_id: str, revision: str | None, with_code: bool) -> Path:
    from huggingface_hub import snapshot_download

    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
    print(f"serve: downloading {repo_id}{f' at {revision}' if revision else ''} from the Hugging Face Hub "
          f"into {os.environ.get('HF_HOME', '~/.cache/huggingface')}", flush=True)
    try:
        patterns = HUB_FILES + (["*.py"] if with_code else [])  # a model's own code, only when trusted
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns))
    except Exception as e:  # hub errors, network errors: one clear line, never the token
        message = str(e).replace(token, "****") if token else str(e)
        raise ConfigError(f"could not download HF_MODEL_ID={repo_id} from the Hugging Face Hub: "
                          f"{type(e).__name__}: {message.splitlines()[0] if message else ''}") from None
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"HF_MODEL_ID={repo_id} has no safetensors weights: this image loads no pickled "
                          "(.bin) weights; convert them, or use a repository that has safetensors")
    _print_commit(repo_id, revision, folder)
    return folder


def _print_commit(repo_id: str, revision: str | None, folder: Path) -> None:
    """Which commit this instance serves; without HF_MODEL_REVISION, how to make every instance serve it."""
    commit = folder.name if COMMIT_SHA.fullmatch(folder.name) else "(unknown)"
    advice = "" if revision else (f"; HF_MODEL_REVISION is unset, so this is the hub's main now: set "
                                  f"HF_MODEL_REVISION={commit} to serve these weights on every instance")
    print(f"serve: HF_MODEL_ID={repo_id} at commit {commit}{advice}", flush=True)


def _holds_a_model(folder: Path) -> bool:
    """train's output, a transformers folder, or custom inference code (which may load anything)."""
    return any((folder / name).exists() for name in (SERVING_SPEC_FILE, "config.json", "code"))
