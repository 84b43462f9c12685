"""serve/adapters.py: the adapters a request may name, the registry every worker shares, and what an adapter
component's folder may hold."""

import json

import pytest

from serve.adapters import Adapter, Adapters, adapter_folder
from serve.errors import BadRequest, NotFound, ValidationError
from serve.schemas import GenerateParams, GenerateRequest


def adapter(folder, rank=8):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def register(adapters, name, src):
    loaded = []
    adapters.register(name, src, load=loaded.append)
    assert [a.name for a in loaded] == [name]  # loaded into this worker's engine before it is recorded
    return loaded[0]


def test_a_registration_is_seen_by_every_worker_and_a_new_one_gets_a_new_id(tmp_path):
    registry = tmp_path / "registry"
    registry.mkdir()
    first, second = (Adapters({}, registry, max_rank=64, source_root=tmp_path) for _ in range(2))  # two workers
    alice = adapter(tmp_path / "alice")
    number = register(first, "alice", str(alice)).number
    assert second.find("alice") == Adapter("alice", number, alice) and second.names() == ["alice"]
    again = register(second, "alice", str(alice)).number  # re-registered: vLLM must not reuse its cache
    assert again != number and first.find("alice").number == again
    unloaded = []
    first.unregister("alice", unload=unloaded.append)
    assert [a.number for a in unloaded] == [again] and second.find("alice") is None
    with pytest.raises(NotFound, match="adapter 'alice' is not registered"):
        second.unregister("alice", unload=unloaded.append)
    assert not list(registry.iterdir())  # nothing half-written left behind


def test_an_adapter_that_does_not_load_is_not_recorded(tmp_path):
    adapters = Adapters({}, tmp_path / "registry", max_rank=64, source_root=tmp_path)
    (tmp_path / "registry").mkdir()

    def refuse(adapter):
        raise ValidationError("could not be loaded")

    with pytest.raises(ValidationError, match="could not be loaded"):
        adapters.register("alice", str(adapter(tmp_path / "alice")), load=refuse)
    assert adapters.names() == []


def test_a_request_gets_the_adapter_it_names_or_the_models_own(tmp_path):
    adapters = Adapters({"dana": "/a/dana", "model": "/m/adapter"}, tmp_path, max_rank=64)
    plain = GenerateRequest("Hi", GenerateParams())
    assert adapters.for_request(plain).name == "model"  # an adapter-only model directory's own
    assert adapters.for_request(GenerateRequest("Hi", GenerateParams(adapter_id="dana"))).path.name == "dana"
    assert adapters.for_request(GenerateRequest("Hi", GenerateParams(), model="dana")).name == "dana"
    assert adapters.for_request(GenerateRequest("Hi", GenerateParams(), model="llm-twin")).name == "model"
    with pytest.raises(ValidationError) as unknown:
        adapters.for_request(GenerateRequest("Hi", GenerateParams(adapter_id="dan")))
    assert unknown.value.message == "unknown adapter 'dan'"  # no other tenant's name in it
    assert Adapters({}).for_request(plain) is None
    with pytest.raises(BadRequest, match="started without ENABLE_LORA"):
        Adapters({}).register("x", "/x", load=print)


def test_a_twin_model_directory_is_an_adapter_through_its_adapter_folder(tmp_path):
    inner = adapter(tmp_path / "twin" / "adapter")
    assert adapter_folder(str(tmp_path / "twin"), tmp_path) == inner


@pytest.mark.parametrize("name, src, error, message", [
    ("a/b", "/x", BadRequest, "adapter name 'a/b' is not valid"),
    ("ok\n", "/x", BadRequest, "is not valid"),
    ("ok", "relative/path", ValidationError, "must be a local absolute path"),
    ("ok", "{root}/no/such/folder", ValidationError, "holds no adapter_config.json"),
    ("llm-twin", "/x", BadRequest, "adapter name 'llm-twin' is reserved"),
    ("model", "/x", BadRequest, "adapter name 'model' is reserved"),
])
def test_bad_registrations_say_what_is_wrong(tmp_path, name, src, error, message):
    with pytest.raises(error, match=message):
        register(Adapters({}, tmp_path, max_rank=64, source_root=tmp_path), name, src.format(root=tmp_path))


def test_a_source_outside_the_root_is_refused_alike_whether_it_exists_or_not(tmp_path):
    root, outside = tmp_path / "root", adapter(tmp_path / "outside")
    root.mkdir()
    (root / "link").symlink_to(outside)  # inside by name, outside once resolved
    adapters = Adapters({}, tmp_path / "registry", max_rank=64, source_root=root)
    (tmp_path / "registry").mkdir()
    errors = []
    for src in (outside, tmp_path / "missing", root / "link", root / ".." / "outside"):
        with pytest.raises(ValidationError) as refused:
            register(adapters, "x", str(src))
        errors.append(refused.value.message.replace(str(src), "SRC"))
    assert errors == [f"adapter src must be a folder under {root} (ADAPTER_SOURCE_ROOT), got 'SRC'"] * 4
    assert adapters.names() == []


def test_two_registrations_of_one_name_at_once_each_write_their_own_file(tmp_path, monkeypatch):
    """Both have written their record before either renames it into place (os.replace waits for both)."""
    import os
    import threading

    registry = tmp_path / "registry"
    registry.mkdir()
    adapters = Adapters({}, registry, max_rank=64, source_root=tmp_path)
    alice, errors = adapter(tmp_path / "alice"), []
    both_written, replace = threading.Barrier(2), os.replace

    def replace_after_both(source, target):
        both_written.wait(timeout=10)
        replace(source, target)

    monkeypatch.setattr(os, "replace", replace_after_both)

    def register_once():
        try:
            adapters.register("alice", str(alice), load=lambda a: None)
        except Exception as e:  # with one temporary file for both, the second rename finds it gone
            errors.append(e)

    threads = [threading.Thread(target=register_once) for _ in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=30) for t in threads]
    assert errors == [] and [p.name for p in registry.iterdir()] == ["alice.json"]
