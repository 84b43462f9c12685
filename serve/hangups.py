"""Clients that hang up while their plain request waits for its answer, noticed without looking for them.

One thread per worker waits on every such connection at once (epoll, for the peer closing or resetting it:
EPOLLRDHUP, EPOLLHUP, EPOLLERR) and tells the request the moment its client is gone, so vLLM aborts it. The
request's own thread sleeps until its answer, its deadline or that news: on a CPU machine each wake-up takes
a core from vLLM's model threads for a moment, and looking every few seconds from 32 waiting threads was a
wake-up a twentieth of a second. A client that sends its next keep-alive request early is still there (new
bytes are not watched for); one that only shuts its sending side is taken as gone, as nginx does.
"""

from __future__ import annotations

import select
import socket
import threading
from contextlib import contextmanager
from typing import Callable

HANG_UP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class HangUps:
    def __init__(self):
        self._epoll: select.epoll | None = None  # made, with its thread, at the first watch (after gunicorn forks)
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def watch(self, sock: socket.socket | None, on_hang_up: Callable[[], None]):
        """While the block runs, `on_hang_up()` is called (from the watching thread, once) if the client closes
        or resets `sock`. The socket must stay open until the block ends. None: nothing to watch."""
        if sock is None:
            yield
            return
        fd = sock.fileno()
        with self._lock:
            if self._epoll is None:
                self._epoll = select.epoll()
                threading.Thread(target=self._run, name="hangups", daemon=True).start()
            self._callbacks[fd] = on_hang_up
            self._epoll.register(fd, HANG_UP)
        try:
            yield
        finally:
            with self._lock:
                if self._callbacks.pop(fd, None) is not None:  # else the watching thread took it, and unregistered
                    self._epoll.unregister(fd)

    def _run(self) -> None:
        while True:
            for fd, _ in self._epoll.poll():
                self._dispatch(fd)

    def _dispatch(self, fd: int) -> None:
        """Calls fd's watcher if its socket has hung up. Asked again, now: between the poll and the lock, the
        watch whose event this was may have ended and its number gone to a new connection, still there."""
        with self._lock:
            callback = self._callbacks.get(fd) if _hung_up(fd) else None
            if callback is not None:
                del self._callbacks[fd]
                self._epoll.unregister(fd)  # once: a hang-up stays readable
        if callback is not None:
            callback()


def _hung_up(fd: int) -> bool:
    now = select.poll()
    now.register(fd, HANG_UP)
    return bool(now.poll(0))
