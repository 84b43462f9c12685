"""serve/lora_cache.py against a stand-in for vLLM's AsyncLLM that keeps its LoRA cache as vLLM 0.32 does:
slots for adapters in use, loading once per version, pins, and old versions unloaded once unused, across
two workers that share one registry. (Through real gunicorn + vLLM: tests/contract/test_adapter_lifecycle.py.)"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from container.model_dir import ServingSpec
from serve.adapters import Adapter, Adapters
from serve.config import ServeConfig
from serve.engine import VllmEngine
from serve.engine_args import engine_arguments, lora_slots
from serve.errors import ValidationError
from serve.faults import EngineFailed
from serve.lora_cache import LoraCache, lora_request


class EngineDeadError(Exception):
    """Named as vLLM's (vllm.v1.engine.exceptions): serve/faults.py classifies errors by their type's name."""


class CacheLLM:
    """vLLM's LRU cache of `capacity` adapters (least recently used out first, never a pinned one), and its
    engine's failure when a batch's adapters do not fit beside the pins."""

    def __init__(self, capacity: int, broken: tuple[str, ...] = (), dead: bool = False):
        self.capacity, self.broken, self.dead = capacity, broken, dead
        self.cache: dict[int, str] = {}  # oldest first
        self.pinned: set[int] = set()
        self.loads: list[int] = []

    async def add_lora(self, request):
        if self.dead:
            raise EngineDeadError("EngineCore encountered an issue")
        if request.lora_path in self.broken:
            raise RuntimeError(f"Loading lora {request.lora_name} failed")
        if request.lora_int_id not in self.cache:
            self.loads.append(request.lora_int_id)
            if len(self.cache) >= self.capacity:
                oldest = next(n for n in self.cache if n not in self.pinned)  # StopIteration: all pinned
                del self.cache[oldest]
        self.cache[request.lora_int_id] = self.cache.pop(request.lora_int_id, request.lora_name)
        return True

    async def remove_lora(self, number):
        self.pinned.discard(number)
        return self.cache.pop(number, None) is not None

    async def pin_lora(self, number):
        if number not in self.cache:
            raise ValueError(f"Pinning failed. LoRA {number} is not registered.")
        self.pinned.add(number)
        return True

    async def list_loras(self):
        return set(self.cache)


def version(name: str, number: int, **options) -> Adapter:
    return Adapter(name, number, Path(f"/adapters/{name}/{number}"), **options)


def run(coroutine):
    return asyncio.run(coroutine)


def cache(slots: int, **llm) -> LoraCache:
    loras = LoraCache(slots)
    loras.llm = CacheLLM(slots, **llm)
    return loras


def test_a_version_loads_once_and_one_that_cannot_load_is_a_422_not_an_engine_fault():
    async def scenario():
        loras = cache(2, broken=("/adapters/bad/9",))
        for _ in range(3):
            async with loras.use(version("alice", 1)):
                pass
        with pytest.raises(ValidationError, match="adapter 'bad' from /adapters/bad/9 could not be loaded"):
            async with loras.use(version("bad", 9)):
                pass
        return loras

    loras = run(scenario())
    assert loras.llm.loads == [1] and loras.in_flight == {} and set(loras.known) == {1}


def test_an_engine_that_died_while_loading_an_adapter_is_a_fatal_fault_not_a_bad_adapter():
    async def scenario():
        async with cache(2, dead=True).use(version("alice", 1)):
            pass

    with pytest.raises(EngineDeadError):  # the fault policy restarts the worker; no 422 blames the adapter
        run(scenario())



def test_a_pinned_adapter_stays_while_the_others_are_evicted_least_recently_used_first():
    async def scenario():
        loras = cache(3)
        pinned, a, b, c = version("p", 1, pin=True), version("a", 2), version("b", 3), version("c", 4)
        seen = []
        for adapter in (pinned, a, b, c, a, b):
            async with loras.use(adapter):
                await loras.llm.add_lora(lora_request(adapter))  # what vLLM's engine step does with the request
            seen.append(sorted(await loras.llm.list_loras()))
        return loras, seen

    loras, seen = run(scenario())
    assert seen == [[1], [1, 2], [1, 2, 3], [1, 3, 4], [1, 2, 4], [1, 2, 3]]  # a, b, then c out; never p
    assert loras.pinned == {1} and loras.llm.pinned == {1}


async def until(condition, seconds: float = 30) -> None:
    """Wait on the event loop, not on the clock: a preempted process must not make a step look skipped."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0)


def test_adapters_in_use_never_outnumber_the_slots_pins_included():
    """vLLM's scheduler would batch MAX_LORAS adapters beside the pinned ones, and its engine would fail:
    a request for one more adapter waits until another's requests end."""
    async def scenario():
        loras = cache(2)
        await loras.begin_registration(version("p", 1, pin=True))  # one slot pinned
        release_a, order = asyncio.Event(), []

        async def ask(adapter, hold=None):
            async with loras.use(adapter):
                order.append(f"{adapter.name} runs")
                if hold is not None:
                    await hold.wait()
            order.append(f"{adapter.name} done")

        first = asyncio.create_task(ask(version("a", 2), hold=release_a))
        await until(lambda: "a runs" in order)
        second = asyncio.create_task(ask(version("b", 3)))
        again = asyncio.create_task(ask(version("a", 2)))  # the same adapter shares its slot
        pinned = asyncio.create_task(ask(version("p", 1, pin=True)))  # a pinned one always has its own
        await until(lambda: len(order) >= 5)  # what can run has run; "b" must still be waiting
        assert order == ["a runs", "a runs", "a done", "p runs", "p done"], order
        release_a.set()
        await asyncio.gather(first, second, again, pinned)
        return order

    assert run(scenario())[-3:] == ["a done", "b runs", "b done"]


def test_a_replaced_version_serves_its_running_requests_then_is_unloaded_in_every_worker(tmp_path):
    """Two workers share the registry; the new version is registered through the first while the second
    has the old one pinned and a stream running on it."""
    registry = tmp_path / "registry"
    registry.mkdir()
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    for folder in ("v1", "v2"):
        (tmp_path / folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
        (tmp_path / folder / "adapter_model.safetensors").write_bytes(b"weights")
    first, second = (Adapters({}, registry, max_rank=64, source_root=tmp_path) for _ in range(2))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    workers = {"first": cache(3), "second": cache(3)}

    def on(worker, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=30)

    @contextmanager
    def load_into_first(adapter):
        on("first", workers["first"].begin_registration(adapter))
        yield
        on("first", workers["first"].end_registration(adapter, first.current()))

    old = first.register("twin", str(tmp_path / "v1"), load=load_into_first, pin=True) and first.find("twin")
    on("second", workers["second"].reconcile(second.current()))  # its once-a-second round: pins the twin there too
    assert workers["second"].pinned == {old.number} and workers["second"].llm.pinned == {old.number}
    stream_ends = asyncio.Event()

    async def stream():
        async with workers["second"].use(second.find("twin")):
            await stream_ends.wait()
        return "finished on the old version"

    running = asyncio.run_coroutine_threadsafe(stream(), loop)
    first.register("twin", str(tmp_path / "v2"), load=load_into_first, pin=True)
    new = second.find("twin")
    assert new.number != old.number and new.path == tmp_path / "v2"
    assert old.number not in workers["first"].known  # nothing used it there: gone at once
    on("second", workers["second"].reconcile(second.current()))
    assert set(workers["second"].known) == {old.number, new.number}  # the stream still runs on the old one
    assert workers["second"].pinned == {old.number, new.number}
    loop.call_soon_threadsafe(stream_ends.set)
    assert running.result(timeout=30) == "finished on the old version"
    on("second", workers["second"].reconcile(second.current()))
    assert set(workers["second"].known) == {new.number} and workers["second"].llm.cache.keys() == {new.number}
    assert workers["second"].pinned == {new.number} == workers["second"].llm.pinned
    first.unregister("twin", unload=lambda adapter: on("first", workers["first"].reconcile(first.current())))
    on("second", workers["second"].reconcile(second.current()))
    assert all(not w.known and not w.llm.cache and not w.pinned for w in workers.values())
    loop.call_soon_threadsafe(loop.stop)


def test_the_engine_refuses_more_pins_than_max_loras_can_keep_beside_the_others(tmp_path):
    config = ServeConfig.from_env({"SAGEMAKER_BASE_DIR": str(tmp_path), "ENABLE_LORA": "true", "MAX_LORAS": "3"})
    registry = tmp_path / "registry"
    registry.mkdir()
    adapters = Adapters({}, registry, max_rank=64, source_root=tmp_path)
    engine = VllmEngine(config, ServingSpec(base_model="tiny", max_input_tokens=50, max_total_tokens=80), adapters,
                        lora_rank=64)
    engine.llm = engine.loras.llm = CacheLLM(3)
    threading.Thread(target=engine._loop.run_forever, daemon=True).start()
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": 8}))
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"weights")
    adapters.register("a", str(tmp_path / "a"), load=engine.load_adapter, pin=True)
    adapters.register("b", str(tmp_path / "b"), load=engine.load_adapter, pin=True)
    with pytest.raises(ValidationError) as refused:
        adapters.register("c", str(tmp_path / "c"), load=engine.load_adapter, pin=True)
    assert refused.value.message.startswith("pin: this endpoint keeps at most 2 adapters pinned (MAX_LORAS=3")
    adapters.register("b", str(tmp_path / "c"), load=engine.load_adapter, pin=True)  # a replacement takes its place
    adapters.register("c", str(tmp_path / "c"), load=engine.load_adapter)  # unpinned, it still has a slot
    loaded = engine.loaded_adapters()
    assert sorted(loaded.values()) == [("a", True), ("b", True), ("c", False)]
    assert adapters.find("b").number in loaded and engine.loras.llm.pinned == {adapters.find(n).number for n in "ab"}
    engine._loop.call_soon_threadsafe(engine._loop.stop)


def test_max_loras_is_both_vllms_cache_and_its_batch_so_the_lru_holds_what_runs(tmp_path, tiny_model):
    (tmp_path / "model").symlink_to(tiny_model, target_is_directory=True)
    spec = ServingSpec(base_model="tiny", max_input_tokens=400, max_total_tokens=512)
    for env, slots in (({"ENABLE_LORA": "true"}, 4), ({"ENABLE_LORA": "true", "MAX_LORAS": "3"}, 3), ({}, 0)):
        config = ServeConfig.from_env({"SAGEMAKER_BASE_DIR": str(tmp_path), **env})
        arguments, _ = engine_arguments(config, spec, 64)
        assert lora_slots(config, spec) == slots
        wanted = (slots, slots) if slots else (None, None)  # no adapters: no LoRA in the engine at all
        assert (arguments.get("max_loras"), arguments.get("max_cpu_loras")) == wanted


def test_each_version_of_an_adapter_is_its_own_lora_for_vllm(tmp_path):
    """vLLM tells LoRARequests apart by name alone (and keys its prefix cache on name and path): two versions
    of one adapter from the same folder must not be one LoRA to it."""
    old, new = (lora_request(Adapter("alice", number, tmp_path)) for number in (1 << 20, (1 << 20) + 7))
    assert old != new and len({old, new}) == 2 and old.lora_name != new.lora_name
    assert (old.lora_int_id, new.lora_int_id) == (1 << 20, (1 << 20) + 7) and old.lora_path == new.lora_path


def test_a_registration_on_a_dead_engine_goes_through_the_fault_policy(tmp_path):
    config = ServeConfig.from_env({"SAGEMAKER_BASE_DIR": str(tmp_path), "ENABLE_LORA": "true"})
    (tmp_path / "registry").mkdir()
    adapters = Adapters({}, tmp_path / "registry", max_rank=64, source_root=tmp_path)
    engine = VllmEngine(config, ServingSpec(base_model="tiny", max_input_tokens=50, max_total_tokens=80), adapters,
                        lora_rank=64)
    engine.llm = engine.loras.llm = CacheLLM(4, dead=True)
    engine.admission._exit_worker = lambda: None  # the worker would exit here
    threading.Thread(target=engine._loop.run_forever, daemon=True).start()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"weights")
    with pytest.raises(EngineFailed, match="could not load the adapter .*EngineDeadError"):
        adapters.register("a", str(tmp_path / "a"), load=engine.load_adapter, preload=True)
    assert engine.admission.failure is not None and adapters.find("a") is None  # /ping fails; nothing recorded
    engine._loop.call_soon_threadsafe(engine._loop.stop)
