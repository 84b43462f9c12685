"""The adapters in one worker's vLLM engine: the versions it has loaded and pinned, the requests using them,
and when an old version may go. Runs on the engine's asyncio loop (serve/engine.py); knows no HTTP, and
the registry (serve/adapters.py) only through the versions it is given.

vLLM 0.32 keeps LoRA adapters in an LRU cache of max_cpu_loras and activates up to max_loras of them for a
batch (vllm/lora/worker_manager.py LRUCacheWorkerLoRAManager, vllm/lora/model_manager.py
LRUCacheLoRAModelManager): a request naming an adapter that is not loaded loads it, evicting the least
recently used one that is not pinned; AsyncLLM.pin_lora pins one in both. serve/engine_args.py sets both to
MAX_LORAS, the `slots` here. Two things vLLM leaves to its caller are done here:

- Its scheduler lets a batch mix max_loras adapters without counting the pinned ones; when a batch's
  adapters do not fit beside the pins, activating them evicts one the same batch needs, and the engine
  process fails. So a request holds a slot while it runs: at most `slots` adapters, pinned ones included,
  are in use at once, a request for another waits for one to free, and pins are limited to slots - 1 so
  that every other adapter can still run.
- An adapter that fails to load inside a batch fails the engine process too. So each version is loaded
  (add_lora) once before its first request here, and a failure is that request's 422.

A registration that replaces a version, or an unregistration, reaches one worker: every worker reconciles
with the registry once a second, removes the versions it no longer names once no request here uses them,
and preloads or pins what the registry asks for.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from contextlib import asynccontextmanager

from serve.adapters import Adapter
from serve.errors import ValidationError
from serve.faults import REQUEST, classify

log = logging.getLogger(__name__)


def lora_request(adapter: Adapter | None):
    """vLLM's LoRARequest for `adapter` (None: the base model). Its name is the version's own: vLLM tells
    LoRARequests apart by name alone (equality, hashing, the prefix cache's keys with the path), so two versions
    of one adapter named alike would share cached KV (stale answers after a re-registration from the same
    folder) and collapse into one in a batch that holds both (the new one then evicted while it runs)."""
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"{adapter.name}@{adapter.number}", adapter.number, str(adapter.path))


class LoraCache:
    def __init__(self, slots: int):
        self.slots = slots  # MAX_LORAS: vLLM's max_loras and max_cpu_loras
        self.llm = None  # vLLM's AsyncLLM, once started
        self.known: dict[int, Adapter] = {}  # versions loaded here at least once (the LRU may have evicted them)
        self.pinned: set[int] = set()
        self.in_flight: Counter = Counter()  # version -> requests using it now; each version holds one slot
        self.registering: set[int] = set()  # versions a registration here loaded and has not recorded yet
        self.tried: set[int] = set()  # versions reconciling loaded (or failed to): once each
        self._changed = asyncio.Event()  # set, and replaced, whenever a slot may have come free
        self._reconciling = asyncio.Lock()

    @property
    def held(self) -> set[int]:
        return self.pinned | set(self.in_flight)

    def free_for(self, adapter: Adapter) -> bool:
        return adapter.number in self.held or len(self.held) < self.slots

    @asynccontextmanager
    async def use(self, adapter: Adapter | None):
        """A request's generation on `adapter`: waits for a slot, loads the version the first time here,
        pins it when its registration asked to."""
        if adapter is None:
            yield
            return
        while not self.free_for(adapter):
            await self._changed.wait()
        self.in_flight[adapter.number] += 1
        try:
            await self._load(adapter)
            yield
        finally:
            self.in_flight[adapter.number] -= 1
            if not self.in_flight[adapter.number]:
                del self.in_flight[adapter.number]
            self._notify()

    async def begin_registration(self, adapter: Adapter) -> None:
        """A registration in this worker: loads (and pins) `adapter` now when it asks to be, and keeps it
        from reconciling until end_registration, while its record is being written."""
        self.registering.add(adapter.number)
        if adapter.pin:
            async with self.use(adapter):
                pass
        elif adapter.preload:
            await self._load(adapter)

    async def end_registration(self, adapter: Adapter, current: dict[str, Adapter]) -> None:
        self.registering.discard(adapter.number)
        await self.reconcile(current)

    async def reconcile(self, current: dict[str, Adapter]) -> None:
        """`current`: every adapter's current version (serve/adapters.py Adapters.current). Removes the
        versions loaded here that it no longer names (replaced, or unregistered) once no request here uses
        them; loads what it asks to be preloaded or pinned and this worker has not, while a slot is free."""
        async with self._reconciling:
            for number, adapter in list(self.known.items()):
                now = current.get(adapter.name)
                stale = now is None or now.number != number
                if stale and number not in self.in_flight and number not in self.registering:
                    await self.llm.remove_lora(number)  # unpins it too
                    del self.known[number]
                    self.pinned.discard(number)
                    self._notify()
                    log.info("adapter %s: version %d unloaded (%s)", adapter.name, number,
                             "unregistered" if now is None else "replaced")
            self.tried &= {adapter.number for adapter in current.values()}
            for adapter in current.values():
                wanted = ((adapter.preload and adapter.number not in self.known)
                          or (adapter.pin and adapter.number not in self.pinned))
                if wanted and adapter.number not in self.tried and self.free_for(adapter):
                    self.tried.add(adapter.number)
                    try:
                        async with self.use(adapter):
                            pass
                    except ValidationError as e:  # its requests will say so
                        log.warning("%s", e.message)

    async def loaded(self) -> dict[int, tuple[str, bool]]:
        """The adapters in vLLM's cache now: version -> (name, pinned)."""
        numbers = await self.llm.list_loras()
        return {n: (self.known[n].name, n in self.pinned) for n in numbers if n in self.known}

    async def _load(self, adapter: Adapter) -> None:
        if adapter.number not in self.known:
            try:
                await self.llm.add_lora(lora_request(adapter))
            except Exception as e:  # vLLM's engine answers a failed add_lora with an error, and lives on
                if classify(e) != REQUEST:  # unless the engine itself died: the fault policy's, not a bad adapter
                    raise
                raise ValidationError(f"adapter {adapter.name!r} from {adapter.path} could not be loaded onto the "
                                      f"base model: {type(e).__name__}: {e}") from None
            self.known[adapter.number] = adapter
        if adapter.pin and adapter.number not in self.pinned:
            if len(self.pinned) >= self.slots - 1:  # an old pinned version still in use here: pinned later
                log.warning("adapter %s: not pinned yet, %d of MAX_LORAS=%d are", adapter.name, len(self.pinned),
                            self.slots)
                return
            try:
                await self.llm.add_lora(lora_request(adapter))  # back in the cache if the LRU evicted it since
                await self.llm.pin_lora(adapter.number)
            except Exception as e:  # it runs unpinned; its next request tries again
                log.warning("adapter %s: pinning failed: %s: %s", adapter.name, type(e).__name__, e)
                return
            self.pinned.add(adapter.number)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
