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
    first, second = Adapters({}, registry, max_rank=64), Adapters({}, registry, max_rank=64)  # two workers
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
    adapters = Adapters({}, tmp_path / "registry", max_rank=64)
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
    with pytest.raises(ValidationError, match="unknown adapter 'dan'; known adapters: dana, model"):
        adapters.for_request(GenerateRequest("Hi", GenerateParams(adapter_id="dan")))
    assert Adapters({}).for_request(plain) is None
    with pytest.raises(BadRequest, match="started without ENABLE_LORA"):
        Adapters({}).register("x", "/x", load=print)


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
        register(Adapters({}, tmp_path, max_rank=64), name, src)


def test_pickled_weights_and_too_large_a_rank_are_refused(tmp_path):
    pickled = adapter(tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(ValidationError, match="safetensors only"):
        register(Adapters({}, tmp_path, max_rank=64), "p", str(pickled))
    wide = adapter(tmp_path / "wide", rank=128)
    with pytest.raises(ValidationError, match="rank 128, above this endpoint's MAX_LORA_RANK=64"):
        register(Adapters({}, tmp_path, max_rank=64), "w", str(wide))
