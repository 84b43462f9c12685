import json

import pytest

from container import model_dir as model_dir_module
from container.model_dir import (PUBLISHING_MARKER, SERVING_SPEC_FILE, TRAINING_REPORT_FILE, ModelDirError, ServingSpec,
                                 load_spec, publish)


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


def test_publish_renames_so_the_model_dir_is_never_seen_part_written(tmp_path, monkeypatch):
    """Every look at model/ during the publish (at each rename) finds the old model whole, nothing, or the
    new model whole."""
    staging = complete_model(tmp_path / "model.partial")
    model_dir = complete_model(tmp_path / "model")
    seen, rename = [], type(model_dir).rename

    def watched(self, target):
        seen.append(sorted(p.name for p in model_dir.iterdir()) if model_dir.exists() else None)
        return rename(self, target)

    monkeypatch.setattr(type(model_dir), "rename", watched)
    publish(staging, model_dir)
    whole = sorted(["config.json", "tokenizer_config.json", "model.safetensors", SERVING_SPEC_FILE])
    assert seen == [whole, None] and sorted(p.name for p in model_dir.iterdir()) == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_publish_into_a_mount_point_leaves_a_marker_serve_refuses_until_the_last_file(tmp_path, monkeypatch):
    staging = complete_model(tmp_path / "model.partial")
    (staging / TRAINING_REPORT_FILE).write_text('{"config": {}, "stages": {}, "base_model": "b"}')
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    moves, move = [], model_dir_module.shutil.move

    def crash_after_two(source, target):
        if len(moves) == 2:
            raise OSError("the instance went away")
        moves.append(source)
        return move(source, target)

    monkeypatch.setattr(model_dir_module.shutil, "move", crash_after_two)
    rename = type(model_dir).rename

    def busy(self, target):  # what renaming a mount point answers
        if self == model_dir:
            raise OSError(16, "Device or resource busy")
        return rename(self, target)

    monkeypatch.setattr(type(model_dir), "rename", busy)
    with pytest.raises(OSError, match="went away"):
        publish(staging, model_dir)
    assert (model_dir / PUBLISHING_MARKER).exists() and len(list(model_dir.iterdir())) == 3  # marker + 2 files
    with pytest.raises(ModelDirError, match="did not finish writing"):
        load_spec(model_dir)
    monkeypatch.setattr(model_dir_module.shutil, "move", move)
    staging = complete_model(tmp_path / "model.again")
    publish(staging, model_dir)  # the rerun publishes whole, marker gone
    assert not (model_dir / PUBLISHING_MARKER).exists() and load_spec(model_dir).max_total_tokens == 20


def test_our_model_without_serving_json_is_refused_not_taken_for_a_plain_folder(tmp_path):
    """A training report but no serving.json: an older image's publish that stopped mid-way."""
    complete_model(tmp_path / "model")
    (tmp_path / "model" / SERVING_SPEC_FILE).unlink()
    (tmp_path / "model" / TRAINING_REPORT_FILE).write_text('{"config": {}, "stages": {}, "base_model": "b"}')
    with pytest.raises(ModelDirError, match="did not finish writing"):
        load_spec(tmp_path / "model")
    (tmp_path / "model" / TRAINING_REPORT_FILE).write_text('{"accuracy": 0.9}')  # someone else's report: a plain folder
    assert load_spec(tmp_path / "model").chat_template_for_inputs is False


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
