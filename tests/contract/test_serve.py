"""The real `serve` entrypoint (gunicorn + Flask) over real HTTP."""

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import BIN, REAP_SECONDS, Server, frozen, sse_events

LLM_TWIN_BODY = {"inputs": "\nYou are a content creator. Write what the user asked you to while using the provided "
                           "context as the primary source of information for the content.\n"
                           "User query: Write a post about LoRA\n"
                           "Context: LoRA trains small adapters.\n            ",
                 "parameters": {"max_new_tokens": 12, "top_p": 0.9, "temperature": 0.01, "return_full_text": False,
                                "repetition_penalty": 1.1}}


def test_ping_is_503_while_loading_then_200(server):
    assert 503 in server.ping_codes, server.ping_codes  # answered while vLLM was starting
    assert server.ping_codes[-1] == 200
    body = requests.get(server.url + "/ping", timeout=10)
    assert body.status_code == 200 and body.text == ""


def test_llm_twin_request_returns_a_completion_without_the_prompt(server):
    response = server.invoke(LLM_TWIN_BODY)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    answer = response.json()
    assert isinstance(answer, list) and len(answer) == 1
    text = answer[0]["generated_text"]
    assert text.strip() and not text.startswith(LLM_TWIN_BODY["inputs"])


def test_return_full_text_prepends_the_inputs_and_details_count_tokens(server):
    body = {"inputs": "Write about evals",
            "parameters": {"max_new_tokens": 5, "return_full_text": True, "details": True}}
    item = server.invoke(body).json()[0]
    assert item["generated_text"].startswith("Write about evals")
    details = item["details"]
    assert details["finish_reason"] in ("length", "eos_token")
    assert 1 <= details["generated_tokens"] <= 5 and details["input_length"] > 3
    assert details["seed"] is None  # greedy


def test_greedy_is_deterministic_and_seed_makes_sampling_reproducible(server):
    greedy = {"inputs": "Hello", "parameters": {"max_new_tokens": 8}}
    assert server.invoke(greedy).json() == server.invoke(greedy).json()
    sampled = {"inputs": "Hello", "parameters": {"max_new_tokens": 8, "do_sample": True, "seed": 7, "details": True}}
    first, second = server.invoke(sampled).json(), server.invoke(sampled).json()
    assert first == second and first[0]["details"]["seed"] == 7


@pytest.mark.parametrize("data,headers,status,error_type", [
    ("{not json", {"Content-Type": "application/json"}, 400, "bad_request"),
    ('{"parameters": {}}', {"Content-Type": "application/json"}, 422, "validation"),
    ('{"inputs": 42}', {"Content-Type": "application/json"}, 422, "validation"),
    ('{"inputs": "x", "parameters": {"max_new_tokens": "ten"}}',
     {"Content-Type": "application/json"}, 422, "validation"),
    ('{"inputs": "x", "parameters": {"max_new_tokens": 100000}}',
     {"Content-Type": "application/json"}, 422, "validation"),
    ('{"inputs": "x"}', {"Content-Type": "text/csv"}, 415, "unsupported_media_type"),
    (b"\xff\xfe", {"Content-Type": "application/json"}, 400, "bad_request"),
    ("[" * 100000 + "]" * 100000, {"Content-Type": "application/json"}, 400, "bad_request"),
    ('{"inputs": "x", "parameters": {"seed": 1' + "0" * 5000 + "}}",
     {"Content-Type": "application/json"}, 400, "bad_request"),
    ('{"inputs": "x", "parameters": {"temperature": 1' + "0" * 400 + "}}",
     {"Content-Type": "application/json"}, 422, "validation"),
])
def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server, data, headers, status, error_type):
    response = server.invoke(data, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type and response.json()["error"]
    assert server.invoke({"inputs": "still there?", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_oversized_body_is_413(server):
    response = server.invoke('{"inputs": "' + "a" * (6 * 1024 * 1024) + '"}')
    assert response.status_code == 413 and "error" in response.json()


def test_unknown_routes_are_json_errors(server):
    response = requests.get(server.url + "/nope", timeout=30)
    assert response.status_code == 404 and response.json()["error_type"] == "not_found"
    assert requests.get(server.url + "/invocations", timeout=30).status_code == 405


def test_serve_refuses_a_missing_model_with_a_clear_message(tmp_path):
    result = subprocess.run([str(BIN / "serve")], env={"SAGEMAKER_BASE_DIR": str(tmp_path), "PATH": str(BIN)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "holds no model" in result.stderr


def test_the_books_deployment_by_hf_model_id_keeps_tgis_limits_refuses_overload_and_drains_on_sigterm(tmp_path,
                                                                                                     tiny_model):
    """The book deploys TGI with HF_MODEL_ID, SM_NUM_GPUS, TGI's token limits and a hub token, no model data.
    Here HF_MODEL_ID is a local folder (no hub from this machine); the hub id path is the next test. The same
    server then shows backpressure (the request past MAX_CONCURRENT_REQUESTS is a 429 at once, not queued) and
    SageMaker's scale-in (SIGTERM: what was accepted finishes, then the server exits 0)."""
    (tmp_path / "model").mkdir()  # SageMaker's /opt/ml/model with no ModelDataUrl: empty
    server = Server(tmp_path, HF_MODEL_ID=str(tiny_model), SM_NUM_GPUS="1", MAX_INPUT_LENGTH="200",
                    MAX_TOTAL_TOKENS="512", MAX_BATCH_TOTAL_TOKENS="2048", HUGGING_FACE_HUB_TOKEN="hf_book_secret",
                    DTYPE="float32", MAX_CONCURRENT_REQUESTS="2", MAX_BATCH_SIZE="2")
    try:
        server.wait_ready()
        response = server.invoke(LLM_TWIN_BODY)
        assert response.status_code == 200, response.text
        assert response.json()[0]["generated_text"].strip()
        too_long = server.invoke({"inputs": "word " * 250})
        assert too_long.status_code == 422 and "inputs must have less than 200 tokens" in too_long.json()["error"]
        too_many = server.invoke({"inputs": "hi", "parameters": {"max_new_tokens": 511}})
        assert too_many.status_code == 422 and "must be <= 512" in too_many.json()["error"]

        slow = {"inputs": "Write a long post", "parameters": {"max_new_tokens": 480}, "stream": True}
        with ThreadPoolExecutor(2) as pool:
            with frozen(server.engines()):  # neither stream can end before the third request, however slow the machine
                posts = [pool.submit(requests.post, server.url + "/invocations", json=slow, stream=True, timeout=120)
                         for _ in range(2)]
                admitted = in_flight(server, 2)
                assert admitted == 2, f"{admitted} streams admitted within 60 s"
                started = time.perf_counter()
                refused = server.invoke({"inputs": "one more", "parameters": {"max_new_tokens": 2}})
                refused_in = time.perf_counter() - started
            events = [post.result(timeout=120).iter_lines(decode_unicode=True) for post in posts]
        assert refused.status_code == 429 and refused.json()["error_type"] == "overloaded", refused.text
        assert refused_in < 15.0  # at once (milliseconds when idle), not after a wait
        assert all(next(line for line in lines if line).startswith("data:") for lines in events)
        server.process.send_signal(signal.SIGTERM)  # SageMaker scaling in: finish what was accepted
        lasts = [json.loads([line for line in lines if line][-1].removeprefix("data:")) for lines in events]
        assert all(last["generated_text"] for last in lasts), lasts
        assert server.process.wait(timeout=REAP_SECONDS) == 0  # gunicorn drains, then vLLM exits
    finally:
        output = server.stop()
    assert "EngineDeadError" not in output and "output_handler failed" not in output  # a normal stop, said as one
    assert f"serving HF_MODEL_ID={tiny_model}" in output and "hf_book_secret" not in output
    assert "batches of up to 2 sequences" in output  # TGI's MAX_BATCH_SIZE, as vLLM's scheduler took it
    frozen_objects = int(re.search(r"model ready: .*; (\d+) objects frozen", output).group(1))
    assert frozen_objects > 100_000  # the startup heap (vLLM, torch, the model) is out of the collector's reach


@pytest.mark.scenario  # make test-scenarios: it waits out most of the stop's 25 s
def test_sigterm_closes_idle_websockets_at_once_and_answers_what_cannot_finish_before_the_kill(
        tiny_served_model, serve_tree):
    """SageMaker scaling in: gunicorn kills a worker 25 s after SIGTERM. An idle bidirectional stream is closed
    at once with 1001 (it would wait up to 330 s for a message), and a stream that cannot finish (its engine
    frozen here) ends 5 s before the kill with a 503 saying so, instead of being cut off without a word."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    server = serve_tree(tiny_served_model, DTYPE="float32", MAX_CONCURRENT_REQUESTS="3")
    route = f"ws://127.0.0.1:{server.port}/invocations-bidirectional-stream"
    idle, busy = connect(route, open_timeout=60), connect(route, open_timeout=60)
    slow = {"inputs": "Write a long post", "parameters": {"max_new_tokens": 480}, "stream": True}
    with frozen(server.engines()), ThreadPoolExecutor(1) as pool:
        post = pool.submit(requests.post, server.url + "/invocations", json=slow, stream=True, timeout=120)
        busy.send(json.dumps(slow))
        assert in_flight(server, 2) == 2
        server.process.send_signal(signal.SIGTERM)
        began = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            idle.recv(timeout=60)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001  # going away, at once
        answered = json.loads(busy.recv(timeout=60))  # the answer in progress goes on, then says why it ended
        with pytest.raises(ConnectionClosed) as closed_after:
            busy.recv(timeout=60)
        response = post.result(timeout=120)
        body = response.text  # to its end
        ended = time.monotonic() - began
    assert answered["error_type"] == "unavailable" and closed_after.value.rcvd.code == 1001, answered
    last = sse_events(body)[-1] if response.status_code == 200 else response.json()
    assert response.status_code in (200, 503) and last["error_type"] == "unavailable", body
    assert "send the request again" in last["error"] and ended < 25  # before gunicorn's kill
    assert server.process.wait(timeout=REAP_SECONDS) == 0


@pytest.mark.scenario  # make test-scenarios: two engines, and one loading again
def test_a_worker_loading_again_leaves_the_traffic_to_the_ready_one(tiny_served_model, serve_tree):
    """Two workers (as an instance with a GPU each has): one's engine dies (a CUDA fault, the OOM killer) and
    gunicorn starts a fresh worker, which loads the model again. Meanwhile it takes no connection, so neither
    SageMaker's /ping nor a request gets its 503 "model is loading": the ready worker answers them all."""
    server = serve_tree(tiny_served_model, DTYPE="float32", SAGEMAKER_MODEL_SERVER_WORKERS="2")
    deadline = time.monotonic() + 180
    while server.log().count("model ready:") < 2:  # both engines warm: the first /ping 200 needs only one
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.5)
    os.kill(server.engines()[0], signal.SIGKILL)
    answers, deadline = [], time.monotonic() + 240
    while server.log().count("model ready:") < 3:  # until the fresh worker's engine is warm
        assert time.monotonic() < deadline, "the fresh worker never loaded:\n" + server.log()[-3000:]
        ping = requests.get(server.url + "/ping", timeout=30)
        answer = server.invoke({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=60)
        answers.append((ping.status_code, answer.status_code, answer.text[:200]))
    loading = [a for a in answers if 503 in a[:2]]
    assert not loading, f"{len(loading)} of {len(answers)} answered while loading: {loading[:3]}"
    assert answers and answers[-1][:2] == (200, 200)


def in_flight(server: Server, wanted: int, timeout: float = 60) -> int:
    """The server's admitted requests (its /metrics gauge) once they are `wanted`, or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = requests.get(server.url + "/metrics", timeout=30).text
        count = int(re.search(r"^llm_twin_requests_in_flight (\d+)$", metrics, re.M).group(1))
        if count == wanted or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


def test_hf_model_id_that_cannot_be_downloaded_is_named_and_the_token_never_printed(tmp_path):
    env = {"SAGEMAKER_BASE_DIR": str(tmp_path), "PATH": str(BIN), "HF_MODEL_ID": "twin-org/no-such-model",
           "HF_MODEL_REVISION": "v1", "HF_TOKEN": "hf_secret_value", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([str(BIN / "serve")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "could not download HF_MODEL_ID=twin-org/no-such-model from the Hugging Face Hub" in result.stderr
    assert "hf_secret_value" not in result.stdout + result.stderr
    # A path that is not a folder is named.
    env["HF_MODEL_ID"] = "/nowhere/model"
    result = subprocess.run([str(BIN / "serve")], env=env, capture_output=True, text=True, timeout=60)
    assert "HF_MODEL_ID='/nowhere/model' is not a folder" in result.stderr
