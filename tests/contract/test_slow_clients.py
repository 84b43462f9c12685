"""Clients that send their request slowly, or never finish it, hold no HTTP thread (serve/worker.py, issue #21).

Most tests run a real gunicorn with serve/worker.py's worker (QuickWorker: short deadlines) and
tests/contract/slow_clients_app.py on 2 threads, over raw sockets; the first runs gunicorn's stock gthread worker
too, which fails it; the last holds the shared real server's threads (tests/conftest.py's `server`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from serve.config import ServeConfig
from serve.worker import MAX_HEAD_BYTES
from local_test.harness import HALF_HEAD, ONE_BYTE, still_open
from tests.helpers import REPO, free_port, wait_for_ping

THREADS = 2
PING_SECONDS = 30  # a busy 2-core host can take seconds to answer; a server that cannot answer never does
STOCK = pytest.param("gthread", marks=pytest.mark.xfail(strict=True, raises=requests.ReadTimeout,
                                                      reason="gthread: a thread per half-sent request"))


class Gunicorn:
    def __init__(self, worker: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--worker-class", worker, "--threads", str(THREADS),
             "--bind", f"127.0.0.1:{self.port}", "--keep-alive", "5", "--graceful-timeout", "20",
             "--no-control-socket", "slow_clients_app:app"],
            env={**os.environ, "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{REPO}"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_ping(self.url, 200, 60, process=self.process)
        except (RuntimeError, TimeoutError) as e:
            raise type(e)(f"{e}\n{self.stop()}") from None

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=15)

    def stop(self) -> str:
        self.process.terminate()
        try:
            return self.process.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.communicate()[0]


@pytest.fixture(scope="module")
def quick():
    server = Gunicorn("slow_clients_app.QuickWorker")
    yield server
    server.stop()


def hold(connect, count: int) -> list[socket.socket]:
    """`count` connections, half of which sent one byte and half half a header block, left waiting."""
    held = []
    for i in range(count):
        held.append(connect())
        held[-1].sendall(ONE_BYTE if i % 2 else HALF_HEAD)
    return held


def response(stream) -> tuple[int, bytes]:
    """The next response on a socket's file: its status and body (interim 1xx answers skipped)."""
    while True:
        status = int(stream.readline().split()[1])
        headers = {}
        while (line := stream.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if status >= 200:
            return status, stream.read(int(headers.get("content-length", 0)))


@pytest.mark.parametrize("worker", ["serve.worker.BufferingWorker", STOCK])
def test_ping_answers_while_more_half_sent_requests_than_threads_wait(worker):
    server = Gunicorn(worker)
    held = []
    try:
        held = hold(server.connect, THREADS + 10)
        # stock gthread never answers: its xfail waits 5 s for that, not PING_SECONDS
        timeout = PING_SECONDS if worker.startswith("serve.") else 5
        assert requests.get(server.url + "/ping", timeout=timeout).status_code == 200
        assert all(map(still_open, held))  # waiting for the rest of their request, not dropped
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_kept_alive_connections_buffer_their_next_request_too(quick):
    connections = [quick.connect() for _ in range(THREADS + 2)]
    streams = [sock.makefile("rb") for sock in connections]
    for sock, stream in zip(connections, streams):
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response(stream) == (200, b"")  # answered by the main loop
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhe")  # the next, half sent
    assert requests.get(quick.url + "/ping", timeout=PING_SECONDS).status_code == 200
    for sock, stream in zip(connections, streams):
        sock.sendall(b"llo")
        assert response(stream) == (200, b"hello")
        sock.close()


def test_ping_is_answered_by_the_main_loop_while_every_thread_is_held(quick, tmp_path):
    release = tmp_path / "release"
    with ThreadPoolExecutor(THREADS + 1) as pool:
        held = [pool.submit(requests.get, quick.url + "/hold", params={"until": str(release)}, timeout=90)
                for _ in range(THREADS)]
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("release.*"))) < THREADS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(tmp_path.glob("release.*"))) == THREADS, "the /hold requests never got their threads"
        via_thread = pool.submit(requests.get, quick.url + "/ping?via=thread", timeout=90)  # a query: the route's
        with socket.create_connection(("127.0.0.1", quick.port), timeout=15) as sock:
            stream = sock.makefile("rb")
            for _ in range(3):  # kept alive between pings
                sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                assert response(stream) == (200, b"")
            sock.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
            assert response(stream) == (200, b"") and stream.read() == b""  # HTTP/1.0: closed after its answer
        assert not via_thread.done()  # every thread is still held
        release.touch()
        assert [future.result().text for future in held] == ["released"] * THREADS
        assert via_thread.result().text == "pong"


def test_pipelined_requests_are_answered_in_order(quick):
    with quick.connect() as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\nPOST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n"
                     b"abcPOST /echo HTTP/1.1\r\nHost: x\r\nContent-Le")
        stream = sock.makefile("rb")
        assert [response(stream), response(stream)] == [(200, b""), (200, b"abc")]
        sock.sendall(b"ngth: 2\r\n\r\nde")
        assert response(stream) == (200, b"de")


def test_a_chunked_body_sent_in_pieces_is_buffered_to_its_last_chunk(quick):
    with quick.connect() as sock:
        for piece in (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", b"lo\r\n",
                      b"1;x=y\r\n!\r\n0\r\n", b"X-Trailer: 1\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(0.05)
        assert response(sock.makefile("rb")) == (200, b"hello!")


def test_expect_100_continue_is_answered_before_the_body_is_sent(quick):
    with quick.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        stream = sock.makefile("rb")
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n" and stream.readline() == b"\r\n"
        sock.sendall(b"abc")
        assert response(stream) == (200, b"abc")


def test_a_head_over_the_cap_is_refused_431_and_closed(quick):
    with quick.connect() as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nX-Long: " + b"a" * MAX_HEAD_BYTES)
        stream = sock.makefile("rb")
        assert response(stream)[0] == 431 and stream.read() == b""


def test_a_body_over_the_apps_cap_is_refused_413_without_waiting_for_it(quick):
    with quick.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
        status, body = response(sock.makefile("rb"))
    assert status == 413 and b"request_entity_too_large" in body


def test_requests_arriving_at_once_hold_a_bounded_number_of_bytes(quick):
    """Each half-sent body holds its bytes in the worker: past the worker's budget (two bodies here), the request
    that would go over is answered 503 and closed, and the others go on."""
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    with quick.connect() as first, quick.connect() as second, quick.connect() as third:
        for sock in (first, second):
            sock.sendall(head + b"a" * 700)  # 2 x 760 bytes held
        third.sendall(head + b"a" * 700)  # 3 x 760 > 2000
        status, body = response(third.makefile("rb"))
        assert status == 503 and b"send the request again" in body
        for sock in (first, second):
            sock.sendall(b"a" * 300)
            assert response(sock.makefile("rb")) == (200, b"a" * 1000)


def test_a_request_not_whole_by_its_deadline_is_answered_408_and_closed(quick):
    began = time.monotonic()  # before the server's accept, where the deadline starts
    with quick.connect() as started, quick.connect() as silent:
        started.sendall(HALF_HEAD)
        stream = started.makefile("rb")
        assert response(stream)[0] == 408 and stream.read() == b""
        assert 4.9 < time.monotonic() - began < 30  # QuickWorker.request_deadline: 5 s
        assert silent.recv(1) == b""  # a connection that sent nothing is closed without an answer


def test_closing_connections_do_not_stall_the_other_clients(quick):
    """Answers with Connection: close to clients that keep their end open: gthread's close_graceful would
    wait up to 2 s for each of them, in the loop that every client waits on (20 s for these ten)."""
    lingering = [quick.connect() for _ in range(10)]
    for sock in lingering:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    time.sleep(0.2)
    began = time.monotonic()
    assert requests.get(quick.url + "/ping", timeout=PING_SECONDS).status_code == 200
    assert time.monotonic() - began < 10  # milliseconds when idle; 20 s with gthread's close_graceful
    for sock in lingering:
        assert response(sock.makefile("rb")) == (200, b"")
        sock.close()


def test_a_stopping_worker_does_not_wait_for_requests_that_never_finish():
    server = Gunicorn("slow_clients_app.QuickWorker")
    held = hold(server.connect, 4)
    try:
        began = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.communicate(timeout=60)
        assert time.monotonic() - began < 17  # QuickWorker.stop_linger: 1 s; graceful_timeout: 20 s
    finally:
        for sock in held:
            sock.close()
        if server.process.poll() is None:
            server.stop()


def test_the_real_server_answers_ping_while_all_its_threads_could_be_held(server):
    held = hold(lambda: socket.create_connection(("127.0.0.1", server.port), timeout=15),
                ServeConfig(model_dir=Path()).threads + 10)
    try:
        # answered at all: with a thread per half-sent request it would wait for them to time out (60 s)
        assert requests.get(server.url + "/ping", timeout=PING_SECONDS).status_code == 200
        assert all(map(still_open, held))
    finally:
        for sock in held:
            sock.close()
