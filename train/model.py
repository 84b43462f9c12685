"""Which base model to fine-tune, loading it for each adapter method, and merging adapters back."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from container.config import ConfigError
from container.model_dir import EMBEDDED_BASE, EMBEDDED_MODEL_ENV, embedded_model_dir
from container.opt_ml import ContractError, OptML
from train.config import JOB_FILE, TrainConfig
from train.instructions import Teacher

log = logging.getLogger(__name__)

MODEL_CHANNEL = "model"
DEFAULT_CONTEXT_TOKENS = 4096  # for a model config that names no max_position_embeddings
TEACHER_CHANNEL = "teacher"
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")  # a full hub commit hash: already pinned, nothing to resolve

# Used only when a base model has no chat template (e.g. a pretrained, non-instruct checkpoint).
# It is saved with the fine-tuned model, so serving prompts exactly as training did.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BaseModel:
    source: str  # what from_pretrained loads: a hub id or a local folder
    reference: str | None  # how an endpoint finds it again for an adapter-only export (None: it cannot)
    revision: str | None = None  # a hub base's commit SHA, which every load pins (None: a local folder)

    def revision_of(self, source: str) -> str | None:
        """The revision to load `source` at: the base's commit, or none for a folder a stage wrote."""
        return self.revision if source == self.source else None


def resolve_base_model(config: TrainConfig, paths: OptML, pinned: str | None = None) -> BaseModel:
    """model_id if given, else the `model` channel (a folder or a model.tar.gz), else the embedded model.
    A hub model_id's revision is resolved to its commit here, unless `pinned` (the launcher's) already is."""
    if config.model_id:
        local = Path(config.model_id)
        if local.is_absolute() or local.is_dir():  # a folder on this machine: no hub revision, no endpoint finds it
            return BaseModel(config.model_id, None)
        return BaseModel(config.model_id, config.model_id, pinned or hub_commit(config.model_id, config.model_revision))
    channel = paths.channel(MODEL_CHANNEL)
    if channel.is_dir():
        return BaseModel(str(_model_folder(channel)), None)
    embedded = embedded_model_dir()
    if not (embedded / "config.json").is_file():
        raise ContractError(
            f"no base model: model_id is not set, there is no '{MODEL_CHANNEL}' channel, and the embedded model "
            f"is missing at {embedded} (run `make model`, or set {EMBEDDED_MODEL_ENV})"
        )
    return BaseModel(str(embedded), EMBEDDED_BASE)


def context_length(model_config) -> int:
    """The model's context in tokens (serving.json's max_total_tokens): its max_position_embeddings, else
    DEFAULT_CONTEXT_TOKENS."""
    return int(getattr(model_config, "max_position_embeddings", 0) or DEFAULT_CONTEXT_TOKENS)


def check_answer_room(config: TrainConfig, base: BaseModel) -> None:
    """max_new_tokens (the served model's default answer length) must leave the prompt room in the base model's
    context: serving.json's max_input_tokens is the context less it. Checked before training, not at export."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(base.source, revision=base.revision,
                                              trust_remote_code=config.trust_remote_code)
    context = context_length(model_config)
    if config.max_new_tokens >= context:
        raise ConfigError(f"hyperparameter max_new_tokens={config.max_new_tokens} leaves no room for a prompt in the "
                          f"base model's context of {context} tokens: use at most {context // 2}, say")


def recorded_commit(config: TrainConfig, checkpoints_dir: Path) -> str | None:
    """The hub commit an earlier run of this training resolved model_id at model_revision to (recorded in its
    checkpoints' job.json): a restart loads the base it trained on, even when the branch has moved since."""
    try:
        found = json.loads((checkpoints_dir / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or (found.get("base_model"), found.get("model_revision")) != (
            config.model_id, config.model_revision):
        return None
    commit = found.get("base_model_revision")
    if isinstance(commit, str) and COMMIT_SHA.fullmatch(commit):
        log.info("base model %s: commit %s, as the earlier run of this training resolved it", config.model_id, commit)
        return commit
    return None


def resolve_teacher(config: TrainConfig, paths: OptML, base: BaseModel) -> Teacher:
    """instructions=auto's teacher: the `teacher` channel (a folder or a model.tar.gz), else teacher_model_id (a
    hub id, pinned to its commit now, or a local path), else the base model."""
    channel = paths.channel(TEACHER_CHANNEL)
    if channel.is_dir():
        return Teacher(str(_model_folder(channel)), None, config.trust_remote_code)
    if config.teacher_model_id:
        local = Path(config.teacher_model_id)
        if local.is_absolute() or local.is_dir():
            return Teacher(config.teacher_model_id, None, config.trust_remote_code)
        return Teacher(config.teacher_model_id, hub_commit(config.teacher_model_id, ""), config.trust_remote_code)
    return Teacher(base.source, base.revision, config.trust_remote_code)


def hub_commit(repo_id: str, revision: str) -> str:
    """The commit that `revision` (a branch, tag or commit; empty: main) of a hub model names now.

    Resolved once, before any download, and passed to every load: the job's stages, its export (and a
    trusted repository's code), serving.json and the model card then all mean the same weights, however the
    branch moves later. huggingface_hub reads HF_TOKEN itself, for gated models."""
    if COMMIT_SHA.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi, get_token

    try:
        commit = HfApi().model_info(repo_id, revision=revision or None).sha
    except Exception as e:  # hub, network or access errors: one clear line, never the token
        token = get_token()
        message = str(e).replace(token, "****") if token else str(e)
        raise ConfigError(f"cannot resolve model_id={repo_id} at revision {revision or 'main'} on the Hugging Face "
                          f"Hub ({type(e).__name__}: {message.splitlines()[0] if message else ''}): check the id, "
                          "model_revision, and HF_TOKEN for a gated model") from None
    if not commit:
        raise ConfigError(f"the Hugging Face Hub names no commit for model_id={repo_id} at {revision or 'main'}")
    log.info("base model %s: revision %s is commit %s", repo_id, revision or "main", commit)
    return commit


def _model_folder(channel: Path) -> Path:
    """The model in the `model` channel: a transformers folder, or a model.tar.gz (an earlier job's output)."""
    if (channel / "config.json").is_file():
        return channel
    tarballs = sorted(channel.glob("*.tar.gz"))
    if len(tarballs) == 1:
        target = _extract_once(tarballs[0])
        found = [p.parent for p in [target / "config.json", *target.glob("*/config.json")] if p.is_file()]
        if found:
            return found[0]
        raise ContractError(f"{tarballs[0]} holds no transformers model (no config.json at its top level)")
    names = ", ".join(sorted(p.name for p in channel.iterdir())[:8]) or "nothing"
    raise ContractError(
        f"the '{MODEL_CHANNEL}' channel {channel} must hold a model folder (config.json) or exactly one "
        f"model.tar.gz (found: {names})"
    )


def _extract_once(tarball: Path) -> Path:
    """Extract to a folder named after the tarball's path and size: the launcher extracts it, the
    workers it starts on the same instance find it complete and reuse it."""
    stat = tarball.stat()
    key = hashlib.sha256(f"{tarball.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / f"llm-twin-base-{key}"
    marker = target / ".extracted"
    if marker.is_file():
        return target
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    log.info("extracting %s to %s", tarball, target)
    try:
        with tarfile.open(tarball) as archive:
            archive.extractall(partial, filter="data")
    except BaseException:  # a stop (SIGTERM) or a bad archive: leave nothing half-extracted behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (partial / ".extracted").touch()
    try:
        partial.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def load_tokenizer(source: str, config: TrainConfig, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=config.trust_remote_code)
    if not tokenizer.chat_template:
        log.info("base model %s has no chat template: using a ChatML template, saved with the model", source)
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_for_training(source: str, config: TrainConfig, dtype, attn_implementation: str | None,
                      revision: str | None = None):
    """The model as the adapter method needs it: in `dtype` (plan.weights_dtype: fp32 for full fine-tuning
    outside DeepSpeed and on the CPU, else 16-bit), or 4-bit nf4 for QLoRA.
    `revision`: the hub commit to load (BaseModel.revision_of), None for a folder."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": dtype, "use_safetensors": True, "revision": revision,
              "trust_remote_code": config.trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if config.adapter == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.float32,
        )
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}  # this process's GPU
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if config.adapter == "qlora":
        from bitsandbytes.nn import Linear4bit
        from peft import prepare_model_for_kbit_training

        quantized = sum(isinstance(m, Linear4bit) for m in model.modules())
        log.info("loaded %s in 4-bit nf4 (bitsandbytes): %d Linear4bit layers", source, quantized)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def merge_adapter(base_source: str, adapter_dir: Path, config: TrainConfig, revision: str | None = None):
    """The base loaded in bf16 with the adapter merged in. Never merges into 4-bit weights: QLoRA's
    adapter is applied to the 16-bit base, as the adapter was trained against its dequantized values."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        base_source, dtype=torch.bfloat16, use_safetensors=True, revision=revision,
        trust_remote_code=config.trust_remote_code,
    )
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def load_trained(source: str, trained: Path, config: TrainConfig, revision: str | None = None):
    """A stage's result as one bf16 model: the full model as trained (a folder: its own code, saved with it,
    still needs trust_remote_code), or its adapter merged onto `source` at `revision`."""
    if config.adapter == "full":
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(trained, dtype=torch.bfloat16, use_safetensors=True,
                                                    trust_remote_code=config.trust_remote_code)
    return merge_adapter(source, trained, config, revision)
