"""serve/adapters.py: the adapters a request may name, the registry every worker shares, what an adapter
component's folder may hold, and AWS's registration fields (preload, pin, the alias header)."""

import json
from contextlib import contextmanager

import pytest

from serve.adapters import Adapter, Adapters, adapter_folder, parse_registration
from serve.errors import BadRequest, NotFound, ValidationError
from serve.schemas import GenerateParams, GenerateRequest, bind_to_adapter_header


def adapter(folder, rank=8):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def register(adapters, name, src, **fields):
    loaded = []

    @contextmanager
    def load(adapter):
        assert adapters.find(name) != adapter  # loaded into this worker's engine before it is recorded
        loaded.append(adapter)
        yield
        assert adapters.find(name) == adapter  # and held there until every worker can see it

    adapters.register(name, src, load=load, **fields)
    assert [a.name for a in loaded] == [name]
    return loaded[0]


@contextmanager
def nothing(adapter):
    yield


def test_a_registration_is_seen_by_every_worker_and_a_new_one_gets_a_new_id(tmp_path):
    registry = tmp_path / "registry"
    registry.mkdir()
    first, second = (Adapters({}, registry, max_rank=64, source_root=tmp_path) for _ in range(2))  # two workers
    alice = adapter(tmp_path / "alice")
    number = register(first, "alice", str(alice)).number
    assert second.find("alice") == Adapter("alice", number, alice, preload=True) and second.names() == ["alice"]
    again = register(second, "alice", str(alice)).number  # re-registered: vLLM must not reuse its cache
    assert again != number and first.find("alice").number == again
    unloaded = []
    first.unregister("alice", unload=unloaded.append)
    assert [a.number for a in unloaded] == [again] and second.find("alice") is None
    with pytest.raises(NotFound, match="adapter 'alice' is not registered"):
        second.unregister("alice", unload=unloaded.append)
    assert sorted(p.name for p in registry.iterdir()) == [".next-id", ".next-id.lock"]  # nothing half-written
    assert register(first, "bob", str(adapter(tmp_path / "bob"))).number == again + 1  # no id is handed out twice


def test_registrations_in_many_workers_at_once_each_get_their_own_id(tmp_path):
    """Each worker process registers at once: vLLM keys loaded adapters and cached prefixes by the id, so two
    adapters sharing one would answer from each other's weights."""
    import multiprocessing

    registry = tmp_path / "registry"
    registry.mkdir()
    folders = [str(adapter(tmp_path / f"twin{i}")) for i in range(8)]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        numbers = pool.starmap(register_in_a_worker, [(registry, tmp_path, f"twin{i}", folder)
                                                      for i, folder in enumerate(folders)])
    assert sorted(numbers) == list(range(numbers and min(numbers), min(numbers) + 8))


def register_in_a_worker(registry, root, name, folder) -> int:
    return register(Adapters({}, registry, max_rank=64, source_root=root), name, folder).number


def test_an_adapter_that_does_not_load_is_not_recorded(tmp_path):
    adapters = Adapters({}, tmp_path / "registry", max_rank=64, source_root=tmp_path)
    (tmp_path / "registry").mkdir()

    @contextmanager
    def refuse(adapter):
        raise ValidationError("could not be loaded")
        yield

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
        Adapters({}).register("x", "/x", load=nothing)


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
    ("tgi", "/x", BadRequest, "adapter name 'tgi' is reserved"),  # a request naming it means the model itself
    ("dummy", "/x", BadRequest, "adapter name 'dummy' is reserved"),
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
        if str(target).endswith(".json"):  # the records, not the id counter (replaced under its own lock)
            both_written.wait(timeout=60)
        replace(source, target)

    monkeypatch.setattr(os, "replace", replace_after_both)

    def register_once():
        try:
            adapters.register("alice", str(alice), load=nothing)
        except Exception as e:  # with one temporary file for both, the second rename finds it gone
            errors.append(e)

    threads = [threading.Thread(target=register_once) for _ in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=30) for t in threads]
    assert errors == [] and sorted(p.name for p in registry.iterdir()) == [".next-id", ".next-id.lock", "alice.json"]


def test_preload_and_pin_are_recorded_for_every_worker_and_pin_implies_preload(tmp_path):
    """AWS's SageMakerRegisterLoRAAdapterRequest: preload defaults to true, pin to false."""
    adapters = Adapters({}, tmp_path / "registry", max_rank=64, source_root=tmp_path)
    (tmp_path / "registry").mkdir()
    alice = adapter(tmp_path / "alice")
    assert parse_registration({"name": "a", "src": "/s"}) == {"name": "a", "src": "/s", "preload": True, "pin": False}
    assert parse_registration({"name": "a", "src": "/s", "preload": False, "pin": True, "prompt_prefix": "x"})[
        "pin"] is True  # a field AWS's model does not know is ignored, as AWS's pydantic model ignores it
    register(adapters, "lazy", str(alice), preload=False)
    register(adapters, "kept", str(alice), pin=True, preload=False, alias="Alice's twin")
    lazy, kept = adapters.find("lazy"), adapters.find("kept")
    assert (lazy.pin, lazy.preload, kept.pin, kept.preload, kept.alias) == (False, False, True, True, "Alice's twin")
    assert [a.name for a in adapters.registered()] == ["kept", "lazy"]
    assert set(adapters.current()) == {"kept", "lazy"}


@pytest.mark.parametrize("body, message", [
    ({"name": "a", "src": "/s", "pin": "true"}, "'pin' must be true or false, got \"true\""),
    ({"name": "a", "src": "/s", "preload": 1}, "'preload' must be true or false, got 1"),
    ({"name": "a", "src": "/s", "pin": None}, "'pin' must be true or false, got null"),
    ({"name": "a", "src": 7}, "registering an adapter needs src (strings)"),
    ({"src": "/s"}, "registering an adapter needs name (strings)"),
])
def test_registration_fields_of_the_wrong_type_are_a_400_naming_the_field(body, message):
    with pytest.raises(BadRequest) as refused:
        parse_registration(body)
    assert message in refused.value.message


def test_the_alias_header_names_the_adapter_in_the_answers_as_awss_library_does(tmp_path):
    adapters = Adapters({}, tmp_path / "registry", max_rank=64, source_root=tmp_path)
    (tmp_path / "registry").mkdir()
    folder = str(adapter(tmp_path / "alice"))
    assert adapters.register("a1", folder, load=nothing, alias="alice")["message"] == "Adapter alice registered"
    assert adapters.register("a2", folder, load=nothing)["message"] == "Adapter a2 registered"
    assert adapters.unregister("a1", unload=lambda a: None, alias="alice")["message"] == "Adapter alice unregistered"
    with pytest.raises(NotFound, match="adapter 'alice' is not registered"):
        adapters.unregister("a1", unload=lambda a: None, alias="alice")


def test_an_unknown_adapter_never_falls_back_to_the_base_model(tmp_path):
    """SageMaker's header (which arrives as adapter_id and as OpenAI's model) and an adapter unregistered
    between its registration and the request: each a 422 naming only what the request named."""
    adapters = Adapters({}, tmp_path / "registry", max_rank=64, source_root=tmp_path)
    (tmp_path / "registry").mkdir()
    register(adapters, "alice", str(adapter(tmp_path / "alice")))
    ask = {"by adapter_id": bind_to_adapter_header(GenerateRequest("Hi", GenerateParams()), "alice"),
           "by model": bind_to_adapter_header(GenerateRequest("Hi", GenerateParams(), messages=[]), "alice")}
    assert {how: adapters.for_request(r).name for how, r in ask.items()} == dict.fromkeys(ask, "alice")
    adapters.unregister("alice", unload=lambda a: None)
    for request in ask.values():
        with pytest.raises(ValidationError, match="unknown (adapter|model) 'alice'"):
            adapters.for_request(request)
    with pytest.raises(ValidationError) as gpt:
        adapters.for_request(GenerateRequest("Hi", GenerateParams(), model="gpt-4o"))
    assert gpt.value.message == "unknown model 'gpt-4o': name an adapter this endpoint serves, or 'llm-twin' for the " \
        "model itself"
    for served in ("llm-twin", "tgi", "dummy", None):  # the served model's names, huggingface_hub's "dummy"
        assert adapters.for_request(GenerateRequest("Hi", GenerateParams(), model=served)) is None
    # an endpoint without adapters ignores `model`, as TGI does: no adapter could be meant
    assert Adapters({}).for_request(GenerateRequest("Hi", GenerateParams(), model="gpt-4o")) is None


def test_a_registered_component_answers_only_to_its_header_and_its_files_stay_in_its_folder(tmp_path):
    """A request without SageMaker's adapter header is an invocation of the base component: its body may name
    LORA_ADAPTERS' adapters, but a registered component (another person's twin) only as an unknown name."""
    adapters = Adapters({"dana": str(adapter(tmp_path / "dana"))}, tmp_path / "registry", max_rank=64,
                        source_root=tmp_path)
    (tmp_path / "registry").mkdir()
    register(adapters, "alice", str(adapter(tmp_path / "alice")))
    errors = []
    for named in ("alice", "carol"):  # registered, and no adapter at all: the same answer
        for request in (GenerateRequest("Hi", GenerateParams(adapter_id=named)),
                        GenerateRequest("Hi", GenerateParams(), messages=[], model=named)):
            with pytest.raises(ValidationError) as refused:
                adapters.for_request(request)
            errors.append(refused.value.message.replace(named, "NAME"))
    assert errors[:2] == errors[2:]
    assert adapters.for_request(GenerateRequest("Hi", GenerateParams(adapter_id="dana"))).name == "dana"
    header = bind_to_adapter_header(GenerateRequest("Hi", GenerateParams()), "alice")
    assert adapters.for_request(header).name == "alice"

    # a component archive whose files are symlinks to another component's: refused, naming the link
    bob = adapter(tmp_path / "bob")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "adapter_config.json").write_text((bob / "adapter_config.json").read_text())
    (linked / "adapter_model.safetensors").symlink_to(bob / "adapter_model.safetensors")
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "adapter").symlink_to(bob, target_is_directory=True)
    for src, link in ((linked, "adapter_model.safetensors"), (nested, "adapter")):
        with pytest.raises(ValidationError, match=f"{link} is a symlink: an adapter's files must be in its own"):
            register(adapters, "mallory", str(src))


def test_the_listing_shows_what_this_workers_engine_holds_and_pages(tmp_path):
    adapters = Adapters({}, tmp_path / "registry", max_rank=64, source_root=tmp_path)
    (tmp_path / "registry").mkdir()
    folder = str(adapter(tmp_path / "alice"))
    a, b, c = (register(adapters, name, folder, pin=name == "b") for name in ("a", "b", "c"))
    engine = {a.number: ("a", False), b.number: ("b", True), 7: ("c", False)}  # 7: an older c, still in use
    rows = adapters.listing(lambda: engine, {})["adapters"]
    assert [(r["name"], r["loaded"], r["pinned"], r["pin"], r["older_versions_loaded"]) for r in rows] == [
        ("a", True, False, False, 0), ("b", True, True, True, 0), ("c", False, False, False, 1)]
    first = adapters.listing(lambda: engine, {"limit": "2"})
    assert [r["name"] for r in first["adapters"]] == ["a", "b"] and first["next_page_token"] == "2"
    last = adapters.listing(lambda: engine, {"limit": "2", "next_page_token": "2"})
    assert [r["name"] for r in last["adapters"]] == ["c"] and "next_page_token" not in last
    only = adapters.listing(lambda: engine, {}, only="b")  # SageMaker's adapter header: that adapter alone
    assert [r["name"] for r in only["adapters"]] == ["b"]
    for query in ({"limit": "0"}, {"limit": "x"}, {"next_page_token": "-1"}):
        with pytest.raises(BadRequest, match="must be a"):
            adapters.listing(lambda: engine, query)
    assert Adapters({}).listing(lambda: 1 / 0, {}) == {"adapters": []}  # the engine is not asked for nothing


def test_an_emptied_id_counter_never_hands_out_an_id_a_registered_adapter_has(tmp_path):
    """A worker killed mid-write of the counter: the next id is still above every registered one."""
    registry = tmp_path / "registry"
    registry.mkdir()
    adapters = Adapters({}, registry, max_rank=64, source_root=tmp_path)
    first = register(adapters, "alice", str(adapter(tmp_path / "alice"))).number
    (registry / ".next-id").write_text("")
    assert register(adapters, "bob", str(adapter(tmp_path / "bob"))).number > first
