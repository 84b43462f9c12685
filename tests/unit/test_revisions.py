"""Revisions pinned: a hub base model is resolved to one commit when the job starts, the launcher's workers
load that commit, and serve loads the commit serving.json records. No hub: its functions are faked."""

import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from container.config import ConfigError
from container.model_dir import EMBEDDED_MODEL_ENV, ServingSpec
from container.opt_ml import OptML
from serve.config import ServeConfig
from serve.custom import CustomHandlers
from serve.engine_args import engine_arguments
from serve.model_source import model_source
from serve.predict import PredictEngine
from train import launcher
from train.config import TrainConfig
from train.model import BaseModel, resolve_base_model

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(monkeypatch) -> list:
    """HfApi.model_info answering SHA for any revision; the (repo, revision) of each call are recorded."""
    calls = []

    def model_info(self, repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision))
        return SimpleNamespace(sha=SHA)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    return calls


def test_a_hub_model_id_is_resolved_to_its_commit_once(tmp_path, hub):
    base = resolve_base_model(TrainConfig(model_id="org/twin-base", model_revision="v1"), OptML(tmp_path))
    assert (base.source, base.reference, base.revision) == ("org/twin-base", "org/twin-base", SHA)
    assert hub == [("org/twin-base", "v1")]
    assert base.revision_of("org/twin-base") == SHA and base.revision_of(str(tmp_path / "sft" / "final")) is None


def test_local_bases_a_full_commit_and_the_launchers_commit_never_ask_the_hub(tmp_path, hub, monkeypatch):
    (tmp_path / "embedded").mkdir()
    (tmp_path / "embedded" / "config.json").write_text("{}")
    monkeypatch.setenv(EMBEDDED_MODEL_ENV, str(tmp_path / "embedded"))
    paths = OptML(tmp_path)
    assert resolve_base_model(TrainConfig(), paths).revision is None
    assert resolve_base_model(TrainConfig(model_id=str(tmp_path / "embedded")), paths).revision is None
    monkeypatch.chdir(tmp_path)  # a relative folder: no endpoint could load it by that name (export=adapter)
    assert resolve_base_model(TrainConfig(model_id="embedded"), paths) == BaseModel("embedded", None)
    assert resolve_base_model(TrainConfig(model_id="org/twin-base", model_revision=SHA), paths).revision == SHA
    pinned = "f" * 40
    assert resolve_base_model(TrainConfig(model_id="org/twin-base"), paths, pinned=pinned).revision == pinned
    assert hub == []


def test_a_revision_the_hub_cannot_resolve_is_a_clear_error_that_hides_the_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")

    def model_info(self, repo_id, revision=None, **kwargs):
        raise RuntimeError("401 Unauthorized for hf_secret_value\nmore")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    with pytest.raises(ConfigError) as refused:
        resolve_base_model(TrainConfig(model_id="org/gated"), OptML(tmp_path))
    assert str(refused.value).startswith("cannot resolve model_id=org/gated at revision main on the Hugging Face Hub "
                                         "(RuntimeError: 401 Unauthorized for ****)")
    assert "hf_secret_value" not in str(refused.value)


def test_the_launcher_hands_its_commit_to_the_workers(monkeypatch):
    started = {}

    class Process:
        def __init__(self, command, env):
            started.update(env)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(launcher.subprocess, "Popen", Process)
    top = launcher.Topology(("algo-1",), "algo-1", 2, None, None)
    assert launcher.launch(TrainConfig(), top, SHA) == (0, None)
    assert started[launcher.BASE_REVISION_ENV] == SHA


def adapter_model(tmp_path: Path) -> tuple[ServeConfig, ServingSpec]:
    """An adapter-only model directory on the hub base org/twin-base, trained at commit SHA."""
    (tmp_path / "model" / "adapter").mkdir(parents=True)
    (tmp_path / "model" / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    spec = ServingSpec(base_model="org/twin-base", max_input_tokens=400, max_total_tokens=512, weights="adapter",
                       has_adapter=True, base_model_revision=SHA)
    return ServeConfig.from_env({"SAGEMAKER_BASE_DIR": str(tmp_path)}), spec


def test_vllm_loads_an_adapters_hub_base_at_the_commit_it_was_trained_on(tmp_path):
    config, spec = adapter_model(tmp_path)
    arguments, _ = engine_arguments(config, spec, 8)
    assert (arguments["model"], arguments["revision"]) == ("org/twin-base", SHA)
    assert arguments["tokenizer"] == str(config.model_dir)  # the tokenizer saved with the adapter: a folder
    merged = ServingSpec(base_model="org/twin-base", max_input_tokens=400, max_total_tokens=512,
                         base_model_revision=SHA)
    assert "revision" not in engine_arguments(config, merged, 0)[0]  # merged weights: the folder is the model


def test_predict_fn_loads_an_adapters_hub_base_at_the_commit_it_was_trained_on(tmp_path, monkeypatch):
    import peft
    import transformers

    config, spec = adapter_model(tmp_path)
    loads = []
    model = SimpleNamespace(eval=lambda: "the model", merge_and_unload=lambda: model, dtype="torch.bfloat16")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda source, **kwargs: "tokenizer")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda source, **kwargs: loads.append((source, kwargs)) or model)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda base, folder: model)
    custom = CustomHandlers(tmp_path / "inference.py", {"predict_fn": lambda data, model: data})
    engine = PredictEngine(config, spec, custom)
    assert engine._load_model() == {"model": "the model", "tokenizer": "tokenizer"}
    assert engine.dtype == "torch.bfloat16"  # /info's model_dtype: the loaded model's
    assert engine.device_type == loads[0][1]["device_map"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert loads[0][0] == "org/twin-base" and loads[0][1]["revision"] == SHA


@pytest.mark.parametrize("revision", ["", "v1"])
def test_hf_model_id_prints_the_commit_it_downloaded(tmp_path, monkeypatch, capsys, revision):
    snapshot = tmp_path / "hub" / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(snapshot))
    (tmp_path / "model").mkdir()
    config = ServeConfig.from_env({"SAGEMAKER_BASE_DIR": str(tmp_path), "HF_MODEL_ID": "org/twin",
                                   "HF_MODEL_REVISION": revision})
    assert model_source(config) == snapshot
    out = capsys.readouterr().out
    assert f"serve: HF_MODEL_ID=org/twin at commit {SHA}" in out
    assert (f"set HF_MODEL_REVISION={SHA} to serve these weights on every instance" in out) == (not revision)


def test_a_restart_loads_the_commit_its_training_was_resolved_to_even_when_the_branch_moved(tmp_path, hub):
    from train.model import recorded_commit

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    earlier = "e" * 40  # what main was when the interrupted run started; the hub says SHA now
    (checkpoints / "job.json").write_text(json.dumps({"base_model": "org/twin-base", "model_revision": "",
                                                      "base_model_revision": earlier}))
    config = TrainConfig(model_id="org/twin-base")
    base = resolve_base_model(config, OptML(tmp_path), pinned=recorded_commit(config, checkpoints))
    assert base.revision == earlier and hub == []  # not resolved again: the checkpoints were trained on it
    for other in (TrainConfig(model_id="org/other"), TrainConfig(model_id="org/twin-base", model_revision="v2")):
        assert recorded_commit(other, checkpoints) is None  # another training: resolved as usual (and refused later)
    (checkpoints / "job.json").write_text("{cut")
    assert recorded_commit(config, checkpoints) is None
