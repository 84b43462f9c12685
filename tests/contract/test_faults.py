"""Serve's fault policy (serve/faults.py) through the real server, each fault injected for real on the CPU:
a predict_fn that raises what CUDA and torch raise, and vLLM's engine process killed outright; gunicorn then
starts a fresh worker. tests/unit/test_app.py shows the same policy on the HTTP layer alone."""

import json
import os
import signal
import threading
import time

import pytest
import requests

from tests.helpers import Server, frozen, wait_for_ping

FAULTY = '''
import torch

def model_fn(model_dir):
    return "model"

def predict_fn(data, model):
    fault = data.get("fault")
    if fault == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if fault == "cuda":
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")  # torch >= 2.8
    if fault == "bug":
        raise KeyError("text")
    return {"ok": True}
'''


def admission(server) -> int:
    text = requests.get(server.url + "/metrics", timeout=30).text
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("llm_twin_admission_limit ")))


def test_a_bug_fails_its_request_oom_lowers_admission_and_a_cuda_error_restarts_the_worker(tmp_path):
    (tmp_path / "model" / "code").mkdir(parents=True)
    (tmp_path / "model" / "code" / "inference.py").write_text(FAULTY)
    server = Server(tmp_path, MAX_CONCURRENT_REQUESTS="8")
    try:
        server.wait_ready()
        bug = server.invoke({"fault": "bug"})
        assert bug.status_code == 424 and bug.json()["error"] == "predict_fn failed: KeyError: 'text'"
        assert requests.get(server.url + "/ping", timeout=10).status_code == 200

        oom = server.invoke({"fault": "oom"})
        assert oom.status_code == 503 and oom.json()["error_type"] == "out_of_memory", oom.text
        assert admission(server) == 4  # halved
        assert server.invoke({}).json() == {"ok": True}  # only the request that caused it failed
        assert requests.get(server.url + "/ping", timeout=10).status_code == 200

        cuda = server.invoke({"fault": "cuda"})
        assert cuda.status_code == 500 and cuda.json()["error_type"] == "engine", cuda.text
        assert "illegal memory access" in cuda.json()["error"]
        # /ping fails until the worker exits, a second later (tests/unit/test_app.py shows it at once); then
        # gunicorn starts a fresh worker, with its full admission again.
        wait_for_ping(server.url, 200, timeout=120)
        assert admission(server) == 8 and server.invoke({}).json() == {"ok": True}
    finally:
        output = server.stop()
    assert "fatal fault, this worker restarts: predict_fn failed: AcceleratorError: CUDA error" in output
    assert output.count("Booting worker") >= 2


def test_vllms_engine_process_killed_fails_requests_in_flight_and_ping_then_a_fresh_worker_serves(server):
    """On the suite's shared server: it ends as it began, a fresh worker serving the same model."""
    body = {"inputs": "Write about lesson 3", "parameters": {"max_new_tokens": 480}, "stream": True}
    pings, stop = [], threading.Event()  # /ping fails for about a second before the worker exits: asked nonstop
    engines = server.engines()  # looked up before: the tiny model's 480 tokens take well under a second
    for _ in range(3):
        events, ended = read_in_background(requests.post(server.url + "/invocations", json=body, stream=True,
                                                          timeout=60))
        assert first_event(events, ended)  # the stream is running: a token came
        with frozen(engines):
            if ended.wait(5):  # it had finished before the freeze (a loaded machine): again
                continue
            threading.Thread(target=ping_until, args=(server.url, pings, stop), daemon=True).start()
            for pid in engines:  # unfinished and unable to finish
                os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer, or a CUDA fault, would end it
            break
    else:
        pytest.fail("three 480-token streams each finished before the engine could be frozen")
    assert ended.wait(120), "the stream in flight never ended"
    last = events[-1]  # the stream in flight got the engine's error
    assert last.get("error_type") == "engine", f"{len(events)} events; the last: {last}"
    # A request now gets a 5xx: this worker's (500) or the fresh one's while it loads (503).
    assert server.invoke({"inputs": "Hi"}, timeout=180).status_code in (500, 503)
    wait_for_ping(server.url, 200, timeout=180)  # gunicorn started a fresh worker, which loaded the model
    stop.set()
    assert 500 in pings, pings[-20:]  # noticed by the engine watch, not only by a request
    answer = server.invoke({"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert answer.status_code == 200, answer.text


def ping_until(url: str, codes: list, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            codes.append(requests.get(url + "/ping", timeout=5).status_code)
        except requests.RequestException as e:  # between workers, or slow
            codes.append(type(e).__name__)
        time.sleep(0.02)


def read_in_background(stream: requests.Response) -> tuple[list, threading.Event]:
    """The stream's events as they come, read by a thread; the event is set when the stream has ended."""
    events, ended = [], threading.Event()

    def read():
        for line in stream.iter_lines(chunk_size=None, decode_unicode=True):  # each event as it comes
            if line:
                events.append(json.loads(line.removeprefix("data:")))
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    return events, ended


def first_event(events: list, ended: threading.Event, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while not events and not ended.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(events)
