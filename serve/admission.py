"""Admission: which requests the engine takes at once, the tickets they get, and what a fault does to them
(serve/faults.py's policy, applied here). No vLLM or torch.

A request holds one slot from admission until the engine is done with it. Out of memory halves the slots,
and they climb back as requests succeed (an eighth of the start's limit after each `limit` successes in a
row); a fatal fault answers every ticket in flight, refuses new requests (/ping fails with it, see Engine.healthy)
and exits the worker a second later, so gunicorn starts a fresh one.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import weakref
from typing import Callable, Iterator

from serve.errors import ClientGone, Overloaded, ServeError, Unavailable, not_finished
from serve.faults import FATAL, MEMORY, EngineFailed, classify, request_error
from serve.schemas import GenerateRequest, GenerateResult

log = logging.getLogger(__name__)

FATAL_EXIT_SECONDS = 1.0  # after a fatal fault, how long the worker answers (/ping failing) before it exits


class Ticket:
    """One admitted request: its events queue, and a way for the client side to give up on it."""

    def __init__(self, request: GenerateRequest, release):
        self.request = request
        self.events: queue.Queue = queue.Queue()
        self.future = None  # the engine loop's task for this request
        self._release = release
        self._released = threading.Lock()

    def close(self) -> None:
        """Give the request up (vLLM aborts it if still running) and free its admission slot."""
        if self.future is not None:
            self.future.cancel()
        self._free_slot()

    def emit(self, kind: str, payload) -> None:
        self.events.put((kind, payload))
        if kind in ("done", "error"):  # the engine is done with it: its slot is free before anyone reads it
            self._free_slot(succeeded=kind == "done")

    def _free_slot(self, succeeded: bool = False) -> None:
        if self._released.acquire(blocking=False):  # exactly once
            self._release(succeeded)

    def hang_up(self) -> None:
        """The client left while it waited (serve/hangups.py): the request is given up at once."""
        self.events.put(("gone", None))

    def stream(self, timeout: float) -> Iterator[tuple[str, object]]:
        """Events until "done" or "error"; releases the request's admission slot at the end. After hang_up,
        ClientGone: the slot is freed and vLLM aborts the generation."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:  # an event already there is taken even past the deadline: a finished answer is kept
                    kind, payload = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError(not_finished(timeout)) from None
                if kind == "gone":
                    raise ClientGone("the client closed its connection")
                yield kind, payload
                if kind in ("done", "error"):
                    return
        finally:
            self.close()

    def result(self, timeout: float) -> GenerateResult:
        for kind, payload in self.stream(timeout):
            if kind == "error":
                raise payload
            if kind == "done":
                return payload


class Admission:
    def __init__(self, limit: int, exit_worker: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGTERM)):
        self.limit = limit  # requests admitted at once; lowered after an out-of-memory fault
        self.start_limit = limit
        self._successes = 0  # in a row since the limit last changed (or the last out-of-memory)
        self.failure: str | None = None  # set once by a fatal fault
        self.stopped: str | None = None  # set once when the worker stops with requests still running
        self._slots = threading.BoundedSemaphore(limit)
        self._owed = 0  # slots to keep when they come back, until the limit is down to its new value
        self.admitted = 0  # requests holding a slot now (/metrics' in-flight gauge)
        self._lock = threading.Lock()
        self._in_flight: weakref.WeakSet = weakref.WeakSet()  # tickets a fatal fault must answer (under the lock)
        self._exit_worker = exit_worker  # gunicorn then starts a fresh worker

    def state(self, ready: bool) -> str:
        """An engine's state for /ping: "failed" after a fatal fault, else "ready" or "loading"."""
        if self.failure is not None:
            return "failed"
        return "ready" if ready else "loading"

    def acquire(self, wait: float = 0.0) -> None:
        """One slot; EngineFailed after a fatal fault, Overloaded when none frees up within `wait` seconds."""
        if self.failure is not None:
            raise EngineFailed(f"{self.failure} (this worker restarts)")
        if self.stopped is not None:
            raise Unavailable(self.stopped)
        if not (self._slots.acquire(timeout=wait) if wait > 0 else self._slots.acquire(blocking=False)):
            raise Overloaded(f"Model is overloaded: more than {self.limit} requests in flight")
        with self._lock:
            self.admitted += 1

    def release(self, succeeded: bool = False) -> None:
        with self._lock:
            self.admitted -= 1
            if succeeded:
                self._count_success()
            if self._owed:
                self._owed -= 1
                return
        self._slots.release()

    def _count_success(self) -> None:
        """Below the start's limit after an out-of-memory, `limit` successes in a row raise it by an eighth of
        the start's limit (under the lock)."""
        if self.limit >= self.start_limit:
            return
        self._successes += 1
        if self._successes < self.limit:
            return
        raised = min(self.start_limit, self.limit + max(1, self.start_limit // 8))
        returned, self._successes = raised - self.limit, 0
        self.limit = raised
        kept = min(self._owed, returned)  # slots still owed are simply no longer taken
        self._owed -= kept
        for _ in range(returned - kept):
            self._slots.release()
        log.info("admitting up to %d requests at once again (%d at the start)", raised, self.start_limit)

    def ticket(self, request: GenerateRequest, wait: float = 0.0) -> Ticket:
        self.acquire(wait)
        return Ticket(request, self.release)

    def track(self, ticket: Ticket) -> None:
        """A ticket the engine is working on: a fatal fault or the worker stopping answers it, also when that
        came between its admission and now."""
        with self._lock:
            self._in_flight.add(ticket)
            failure, stopped = self.failure, self.stopped
        if failure is not None:
            ticket.emit("error", EngineFailed(f"{failure} (this worker restarts)"))
        elif stopped is not None:
            ticket.emit("error", Unavailable(stopped))

    def fault(self, error: BaseException, what: str) -> ServeError:
        """Apply the policy to a failure during generation; returns the failing request's error."""
        kind = classify(error)
        if kind == MEMORY:
            self._lower()
        elif kind == FATAL:
            self.fail(f"{what}: {type(error).__name__}: {error}")
        return request_error(kind, what, error)

    def fail(self, reason: str) -> None:
        """The device or the engine cannot be trusted: answer every request in flight, fail /ping, and exit
        the worker shortly after (gunicorn starts a fresh one, which loads the model again)."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
            tickets = list(self._in_flight)
        threading.Timer(FATAL_EXIT_SECONDS, self._exit_worker).start()
        log.error("fatal fault, this worker restarts: %s", reason)
        for ticket in tickets:
            ticket.emit("error", EngineFailed(f"{reason} (this worker restarts)"))

    def stop(self, reason: str) -> None:
        """The worker is stopping and will be killed soon: answer every request still in flight (a stream gets
        a last event saying why, rather than a connection cut mid-answer) and refuse new ones."""
        with self._lock:
            self.stopped = reason
            tickets = list(self._in_flight)
        if tickets:
            log.warning("stopping: %d requests still running are answered 503", len(tickets))
        for ticket in tickets:
            ticket.emit("error", Unavailable(reason))

    def _lower(self) -> None:
        """Halve the limit (at least one): free slots are taken at once, the others kept as they come back."""
        with self._lock:
            lowered = max(1, self.limit // 2)
            self._owed += self.limit - lowered
            self.limit, self._successes = lowered, 0
            while self._owed and self._slots.acquire(blocking=False):
                self._owed -= 1
        log.warning("out of memory: admitting at most %d requests at once from now on", lowered)
