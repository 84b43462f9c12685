"""The engine: one thread per worker that owns the model and batches every request it is given.

HTTP threads submit requests and read their events from a per-request queue: "token" events while the
sequence runs (for streaming), then "done" with the result, or "error". Only the engine thread
touches the model, so /ping never waits behind a generation. The engine thread imports torch and loads
the model itself, so the HTTP side answers /ping (503) within a second of starting.

Backpressure: at most `max_concurrent_requests` requests are admitted at once; the next one is refused
at once (429) rather than queued without bound.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Iterator

from container.model_dir import ServingSpec
from serve.config import ServeConfig
from serve.custom import CustomHandlers
from serve.errors import GenerationError, Overloaded, ServeError, ValidationError
from serve.schemas import GenerateParams, GenerateRequest, GenerateResult

log = logging.getLogger(__name__)

WORKER_BOOT_ERROR = 3  # gunicorn stops the whole server when a worker exits with this code


class Ticket:
    """One admitted request: its events queue, and a way for the client side to give up on it."""

    def __init__(self, request: GenerateRequest, release):
        self.request = request
        self.events: queue.Queue = queue.Queue()
        self.cancelled = False
        self._release = release
        self._closed = threading.Lock()

    def close(self) -> None:
        """Give the request up (if still running) and free its admission slot, exactly once."""
        self.cancelled = True
        if self._closed.acquire(blocking=False):
            self._release()

    def emit(self, kind: str, payload) -> None:
        self.events.put((kind, payload))

    def stream(self, timeout: float) -> Iterator[tuple[str, object]]:
        """Events until "done" or "error"; releases the request's admission slot at the end."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    kind, payload = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError("generation did not finish within the server timeout") from None
                yield kind, payload
                if kind in ("done", "error"):
                    return
        finally:
            self.close()

    def result(self, timeout: float) -> GenerateResult:
        for kind, payload in self.stream(timeout):
            if kind == "done":
                return payload
            if kind == "error":
                raise payload
        raise GenerationError("generation ended without a result")


class Job:
    """A callable run on the engine thread between decode steps (custom predict_fn)."""

    def __init__(self, function: Callable):
        self.function = function
        self.future: Future = Future()

    def run(self, model) -> None:
        if self.future.set_running_or_notify_cancel():
            try:
                self.future.set_result(self.function(model))
            except Exception as e:  # handed to the waiting HTTP thread, which reports it
                self.future.set_exception(e)


class Engine:
    def __init__(self, config: ServeConfig, spec: ServingSpec, custom: CustomHandlers | None = None):
        self.config = config
        self.spec = spec
        self.custom = custom
        self.model = None  # what a custom predict_fn receives
        self._requests: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._slots = threading.BoundedSemaphore(config.max_concurrent_requests)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerateRequest) -> Ticket:
        if not self._slots.acquire(blocking=False):
            raise Overloaded(f"Model is overloaded: more than {self.config.max_concurrent_requests} requests in flight")
        ticket = Ticket(request, self._slots.release)
        self._requests.put(ticket)
        return ticket

    def run_job(self, function: Callable):
        """Run function(model) on the engine thread and return its result."""
        if not self._slots.acquire(blocking=False):
            raise Overloaded(f"Model is overloaded: more than {self.config.max_concurrent_requests} requests in flight")
        try:
            job = Job(function)
            self._requests.put(job)
            try:
                return job.future.result(timeout=self.config.timeout)
            except TimeoutError:
                job.future.cancel()
                raise
        finally:
            self._slots.release()

    # --- engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            batcher = self._load()
        except Exception:
            log.exception("loading the model from %s failed", self.config.model_dir)
            os._exit(WORKER_BOOT_ERROR)
        self._ready.set()
        while True:
            busy = batcher is not None and batcher.active
            items = [] if busy else [self._requests.get()]
            while (batcher.active if batcher else 0) + len(items) < (batcher.max_batch_size if batcher else 1):
                try:
                    items.append(self._requests.get_nowait())
                except queue.Empty:
                    break
            joining = []
            for item in items:
                if isinstance(item, Job):
                    item.run(self.model)
                else:
                    joining.append(item)
            if batcher is None:
                continue
            self._serve_batch(batcher, joining)
            if not batcher.active:
                continue
            try:
                batcher.step()
            except Exception as e:  # a failed forward pass fails the requests in it, never the engine
                log.exception("generation failed")
                for seq in batcher.fail_all():
                    seq.emit("error", GenerationError(f"Request failed during generation: {type(e).__name__}: {e}"))

    def _load(self):
        """The built-in model (with batching), or what a custom model_fn returns (no batcher)."""
        if self.custom is not None and "model_fn" in self.custom:
            self.model = self.custom["model_fn"](str(self.config.model_dir))
            log.info("model ready from %s's model_fn", self.custom.path)
            return None
        from serve.batcher import Batcher  # torch loads here, in the engine thread

        batcher = Batcher(self.config, self.spec)
        warmup = Ticket(GenerateRequest("Hello", GenerateParams(max_new_tokens=2)), lambda: None)
        self._serve_batch(batcher, [warmup])
        while batcher.active:
            batcher.step()
        warmup.result(timeout=1)  # raises what the warm-up generation raised
        self.model = {"model": batcher.model, "tokenizer": batcher.tokenizer}
        log.info("model ready on %s (%s), batches of up to %d", batcher.device, batcher.dtype, self.config.max_batch_size)
        return batcher

    def _serve_batch(self, batcher, tickets: list[Ticket]) -> None:
        """Admit tickets into the running batch. A request that cannot be tokenized (a chat template may
        refuse its messages) or prefilled fails alone; the running batch is untouched by either."""
        joining = []
        for ticket in tickets:
            if ticket.cancelled:
                continue
            try:
                joining.append(batcher.prepare(ticket.request, ticket.emit, lambda t=ticket: t.cancelled))
            except ServeError as e:
                ticket.emit("error", e)
            except Exception as e:  # e.g. jinja's TemplateError: "roles must alternate"
                ticket.emit("error", ValidationError(f"the prompt could not be built: {type(e).__name__}: {e}"))
        if not joining:
            return
        try:
            batcher.add(joining)
        except Exception as e:
            log.exception("prefill failed")
            for seq in joining:
                seq.emit("error", GenerationError(f"Request failed during generation: {type(e).__name__}: {e}"))
