"""serve/adapters.py: the registry every worker shares, and what an adapter component's folder may hold."""

import json

import pytest

from serve.adapters import AdapterRegistry, adapter_folder
from serve.errors import BadRequest, NotFound, ValidationError


def adapter(folder, rank=8):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def register(registry, name, src, max_rank=64):
    folder, number = registry.check(name, src, max_rank)
    registry.record(name, folder, number)
    return folder, number


def test_a_registration_is_seen_by_every_worker_and_a_new_one_gets_a_new_id(tmp_path):
    registry = tmp_path / "registry"
    registry.mkdir()
    first, second = AdapterRegistry(registry), AdapterRegistry(registry)  # two workers
    alice = adapter(tmp_path / "alice")
    _, number = register(first, "alice", str(alice))
    assert second.lookup("alice") == (alice, number) and second.names() == ["alice"]
    _, again = register(second, "alice", str(alice))  # re-registered: vLLM must not reuse its cache
    assert again != number and first.lookup("alice") == (alice, again)
    assert first.unregister("alice") == again and second.lookup("alice") is None
    with pytest.raises(NotFound, match="adapter 'alice' is not registered"):
        second.unregister("alice")
    assert not list(registry.iterdir())  # nothing half-written left behind


def test_a_twin_model_directory_is_an_adapter_through_its_adapter_folder(tmp_path):
    inner = adapter(tmp_path / "twin" / "adapter")
    assert adapter_folder(str(tmp_path / "twin")) == inner


@pytest.mark.parametrize("name, src, error, message", [
    ("a/b", "/x", BadRequest, "adapter name 'a/b' is not valid"),
    ("ok\n", "/x", BadRequest, "is not valid"),
    ("ok", "relative/path", ValidationError, "must be a local absolute path"),
    ("ok", "/no/such/folder", ValidationError, "holds no adapter_config.json"),
])
def test_bad_registrations_say_what_is_wrong(tmp_path, name, src, error, message):
    with pytest.raises(error, match=message):
        register(AdapterRegistry(tmp_path), name, src)


def test_pickled_weights_and_too_large_a_rank_are_refused(tmp_path):
    pickled = adapter(tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(ValidationError, match="safetensors only"):
        register(AdapterRegistry(tmp_path), "p", str(pickled))
    wide = adapter(tmp_path / "wide", rank=128)
    with pytest.raises(ValidationError, match="rank 128, above this endpoint's MAX_LORA_RANK=64"):
        register(AdapterRegistry(tmp_path), "w", str(wide))
