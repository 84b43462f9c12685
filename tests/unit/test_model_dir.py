import json

import pytest

from container.model_dir import SERVING_SPEC_FILE, ModelDirError, ServingSpec, load_spec, publish


def complete_model(path):
    path.mkdir(parents=True)
    for name in ("config.json", "tokenizer_config.json", "model.safetensors"):
        (path / name).write_text("{}")
    ServingSpec(base_model="b", max_input_tokens=10, max_total_tokens=20).write(path)
    return path


def test_publish_replaces_the_model_dir_contents_and_removes_staging(tmp_path):
    staging = complete_model(tmp_path / "model.partial")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "stale.bin").write_text("old")
    publish(staging, model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        ["config.json", "tokenizer_config.json", "model.safetensors", SERVING_SPEC_FILE])
    assert not staging.exists()
    assert load_spec(model_dir).max_total_tokens == 20


def test_publish_refuses_an_incomplete_staging_dir(tmp_path):
    staging = complete_model(tmp_path / "model.partial")
    (staging / "model.safetensors").unlink()
    model_dir = tmp_path / "model"
    with pytest.raises(ModelDirError, match=r"missing \*\.safetensors"):
        publish(staging, model_dir)
    assert not model_dir.exists()


def test_a_plain_transformers_folder_is_served_with_tgi_semantics(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    spec = load_spec(tmp_path)
    assert (spec.max_total_tokens, spec.chat_template_for_inputs) == (1024, False)


def test_an_empty_or_partial_model_dir_is_rejected(tmp_path):
    with pytest.raises(ModelDirError, match="holds no model"):
        load_spec(tmp_path)
    complete_model(tmp_path / "m")
    (tmp_path / "m" / "tokenizer_config.json").unlink()
    with pytest.raises(ModelDirError, match="incomplete: missing tokenizer_config.json"):
        load_spec(tmp_path / "m")


def test_unknown_format_version_is_rejected(tmp_path):
    model = complete_model(tmp_path / "m")
    spec = json.loads((model / SERVING_SPEC_FILE).read_text())
    (model / SERVING_SPEC_FILE).write_text(json.dumps({**spec, "format_version": 99}))
    with pytest.raises(ModelDirError, match="format_version 99 is not supported"):
        load_spec(model)
