"""Serve's fault policy (serve/faults.py) through the real server, each fault injected for real on the CPU:
a predict_fn that raises what CUDA and torch raise, and vLLM's engine process killed outright."""

import json
import subprocess
import threading
import time

import requests

from tests.conftest import Server

FAULTY = '''
import torch

def model_fn(model_dir):
    return "model"

def predict_fn(data, model):
    fault = data.get("fault")
    if fault == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if fault == "cuda":
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    if fault == "bug":
        raise KeyError("text")
    return {"ok": True}
'''


def admission(server) -> int:
    text = requests.get(server.url + "/metrics", timeout=5).text
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("llm_twin_admission_limit ")))


def wait_for_ping(server, wanted, timeout: float) -> float:
    begun = time.monotonic()
    while time.monotonic() - begun < timeout:
        try:
            if requests.get(server.url + "/ping", timeout=2).status_code == wanted:
                return time.monotonic() - begun
        except requests.RequestException:  # between workers: refused, or accepted and answered by the next
            pass
        time.sleep(0.05)
    raise AssertionError(f"/ping never answered {wanted} within {timeout} s")


def test_a_bug_fails_its_request_oom_lowers_admission_and_a_cuda_error_restarts_the_worker(tmp_path):
    (tmp_path / "model" / "code").mkdir(parents=True)
    (tmp_path / "model" / "code" / "inference.py").write_text(FAULTY)
    server = Server(tmp_path, MAX_CONCURRENT_REQUESTS="8")
    try:
        server.wait_ready()
        bug = server.invoke({"fault": "bug"})
        assert bug.status_code == 424 and bug.json()["error"] == "predict_fn failed: KeyError: 'text'"
        assert requests.get(server.url + "/ping", timeout=2).status_code == 200

        oom = server.invoke({"fault": "oom"})
        assert oom.status_code == 503 and oom.json()["error_type"] == "out_of_memory", oom.text
        assert admission(server) == 4  # halved
        assert server.invoke({}).json() == {"ok": True}  # only the request that caused it failed
        assert requests.get(server.url + "/ping", timeout=2).status_code == 200

        cuda = server.invoke({"fault": "cuda"})
        assert cuda.status_code == 500 and cuda.json()["error_type"] == "engine", cuda.text
        assert "illegal memory access" in cuda.json()["error"]
        assert requests.get(server.url + "/ping", timeout=2).status_code == 500  # at once
        wait_for_ping(server, 200, timeout=60)  # a fresh worker, with its full admission again
        assert admission(server) == 8 and server.invoke({}).json() == {"ok": True}
    finally:
        output = server.stop()
    assert "fatal fault, this worker restarts: predict_fn failed: RuntimeError: CUDA error" in output
    assert output.count("Booting worker") >= 2


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        children = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True).stdout.split()
        found += map(int, children)
        todo += map(int, children)
    return found


def test_vllms_engine_process_killed_fails_requests_in_flight_and_ping_then_a_fresh_worker_serves(tiny_served_model):
    server = Server(tiny_served_model)
    try:
        server.wait_ready()
        engines = [pid for pid in descendants(server.process.pid)
                   if "EngineCore" in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
                   or "EngineCore" in open(f"/proc/{pid}/comm").read()]
        assert engines, "no vLLM engine-core process found"
        answers = []
        stream = threading.Thread(target=lambda: answers.append(server.invoke(
            {"inputs": "Write about lesson 3", "parameters": {"max_new_tokens": 480}, "stream": True})))
        stream.start()
        time.sleep(0.2)  # the stream is running (or, on a fast machine, already done)
        for pid in engines:
            subprocess.run(["kill", "-9", str(pid)])  # as the kernel's OOM killer, or a CUDA fault, would end it
        assert wait_for_ping(server, 500, timeout=5) < 5  # noticed by the engine watch, not only by a request
        stream.join(timeout=30)
        assert not stream.is_alive(), "the request in flight hung"
        if answers[0].status_code == 200:  # it ended with a last event: the engine's error, or a finished answer
            last = json.loads(answers[0].text.strip().splitlines()[-1].removeprefix("data:"))
            assert last.get("error_type") == "engine" or last["generated_text"] is not None, last
        else:
            assert answers[0].status_code == 500 and answers[0].json()["error_type"] == "engine", answers[0].text
        try:  # a request now: a 5xx at once (or the fresh worker loading: 503), never a hang
            assert server.invoke({"inputs": "Hi"}, timeout=10).status_code >= 500
        except requests.RequestException:
            pass
        wait_for_ping(server, 200, timeout=120)  # gunicorn started a fresh worker, which loaded the model
        answer = server.invoke({"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
        assert answer.status_code == 200, answer.text
    finally:
        output = server.stop()
    assert "fatal fault, this worker restarts: the vLLM engine process is gone" in output \
        or "fatal fault, this worker restarts: the request failed during generation: EngineDeadError" in output
