"""train/export.py without a training run: what it records of a hub base, what it passes to every load, and
the free-space check that refuses a volume too small before anything is written."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from container.config import ConfigError
from container.model_dir import SERVING_SPEC_FILE, TRAINING_REPORT_FILE
from container.opt_ml import OptML
from train import export
from train.config import TrainConfig
from train.model import BaseModel, load_trained
from train.pipeline import start_report

SHA = "0123456789abcdef0123456789abcdef01234567"
HUB_BASE = BaseModel("org/twin-base", "org/twin-base", SHA)


class Tokenizer:
    """What export needs of a tokenizer: it saves itself."""

    eos_token_id = pad_token_id = 0

    def save_pretrained(self, folder: Path) -> None:
        (folder / "tokenizer_config.json").write_text("{}")


def small_llama():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)


@pytest.fixture
def config_calls(monkeypatch) -> list:
    """AutoConfig.from_pretrained as export calls it: its arguments are recorded, a small Llama's config returned."""
    calls = []

    def from_pretrained(source, **kwargs):
        calls.append((source, kwargs))
        return small_llama()

    monkeypatch.setattr(export.AutoConfig, "from_pretrained", from_pretrained)
    return calls


def adapter_folder(tmp_path: Path) -> Path:
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (trained / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    return trained


def export_adapter(tmp_path: Path, config: TrainConfig, base: BaseModel = HUB_BASE) -> OptML:
    paths = OptML(tmp_path / "opt_ml")
    paths.root.mkdir()
    report = start_report(config, base, SimpleNamespace(bf16=False))
    export.export_model(config, paths, Tokenizer(), base, base.source, adapter_folder(tmp_path), report)
    return paths


def test_a_hub_base_is_recorded_at_its_commit_in_serving_json_the_report_and_the_card(tmp_path, config_calls):
    paths = export_adapter(tmp_path, TrainConfig(model_id="org/twin-base", export="adapter"))
    spec = json.loads((paths.model_dir / SERVING_SPEC_FILE).read_text())
    assert (spec["base_model"], spec["base_model_revision"], spec["weights"]) == ("org/twin-base", SHA, "adapter")
    assert json.loads((paths.model_dir / TRAINING_REPORT_FILE).read_text())["base_model_revision"] == SHA
    assert f"Base model revision: commit `{SHA}`" in (paths.model_dir / export.MODEL_CARD_FILE).read_text()


def test_a_local_base_records_no_revision(tmp_path, config_calls):
    local = BaseModel(str(tmp_path / "base"), "embedded")  # the embedded model: a folder in the image
    paths = export_adapter(tmp_path, TrainConfig(export="adapter"), local)
    assert json.loads((paths.model_dir / SERVING_SPEC_FILE).read_text())["base_model_revision"] is None
    assert "Base model revision" not in (paths.model_dir / export.MODEL_CARD_FILE).read_text()
    assert config_calls[0][1]["revision"] is None


def test_export_reads_the_bases_config_at_its_commit_and_with_trust_remote_code(tmp_path, config_calls):
    export_adapter(tmp_path, TrainConfig(model_id="org/twin-base", export="adapter", trust_remote_code=True))
    assert config_calls == [("org/twin-base", {"revision": SHA, "trust_remote_code": True})]


def test_a_full_fine_tunes_model_is_loaded_with_trust_remote_code(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    calls = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda source, **kwargs: calls.append(kwargs))
    load_trained("org/twin-base", tmp_path, TrainConfig(adapter="full", trust_remote_code=True), SHA)
    assert calls[0]["trust_remote_code"] is True


def test_merged_weights_are_estimated_at_two_bytes_a_parameter_without_loading_them(tmp_path):
    from transformers import AutoModelForCausalLM

    expected = sum(p.numel() for p in AutoModelForCausalLM.from_config(small_llama()).parameters())
    assert export.parameter_count(small_llama(), False) == expected
    trained = adapter_folder(tmp_path)
    merged = export.export_bytes(TrainConfig(), small_llama(), trained, {})
    both = export.export_bytes(TrainConfig(export="both"), small_llama(), trained, {})
    adapter = sum((trained / name).stat().st_size for name in export.ADAPTER_FILES)
    assert merged == export.EXPORT_SLACK_BYTES + 2 * expected and both == merged + adapter


def test_a_volume_too_small_fails_the_export_before_writing_anything(tmp_path, config_calls, monkeypatch):
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**9 // 4))
    monkeypatch.setattr(export, "load_trained", lambda *args: pytest.fail("the export's time was spent"))
    paths = OptML(tmp_path / "opt_ml")
    paths.root.mkdir()
    paths.model_staging_dir.mkdir()  # a stopped earlier export left its files: they go, their space counts
    (paths.model_staging_dir / "model.safetensors").write_bytes(b"\0" * 1024)
    with pytest.raises(ConfigError) as refused:
        export.export_model(TrainConfig(), paths, Tokenizer(), HUB_BASE, HUB_BASE.source, tmp_path / "trained", {},
                            {"preference_pairs.jsonl": _file(tmp_path / "pairs.jsonl", 10**9)})
    message = str(refused.value)
    assert message.startswith("not enough disk space to export the model: it needs about 1.1 GB and ")
    assert "has 0.2 GB free (0.8 GB short)" in message and "VolumeSizeInGB" in message
    assert not paths.model_dir.exists() and not paths.model_staging_dir.exists()


def _file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)  # sparse: its size, without the disk space
    return path
