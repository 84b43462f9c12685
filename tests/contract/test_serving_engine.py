"""Batching, streaming, chat, backpressure and shutdown of the real server (tiny model, real HTTP)."""

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import sse_events as parse_sse

PROMPTS = [f"Write about lesson {i} of shipping models" + " really" * i for i in range(8)]


def sse_events(response) -> list:
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return parse_sse(response.text)


def generate(server, prompt, **parameters):
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 12, "details": True, **parameters}}
    response = server.invoke(body)
    assert response.status_code == 200, response.text
    return response.json()[0]


def test_concurrent_requests_are_batched_and_answer_as_if_alone(server):
    alone = [generate(server, p, max_new_tokens=6 + i) for i, p in enumerate(PROMPTS)]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda ip: generate(server, ip[1], max_new_tokens=6 + ip[0]), enumerate(PROMPTS)))
    assert together == alone  # per-request lengths and padding do not change what a request gets
    assert [a["details"]["generated_tokens"] for a in alone] == [6 + i for i in range(8)]

    # Long streams sent at once (a barrier). A stream that meets the end-of-text token early is left out: on a
    # loaded machine it can be over before another client's request has even left.
    ready = threading.Barrier(len(PROMPTS), timeout=120)

    def stream(prompt):  # when its first and its last event arrived, and why it ended
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 450, "details": True}, "stream": True}
        ready.wait()
        lines = [(time.monotonic(), line) for line in server.invoke(body, stream=True).iter_lines() if line]
        last = json.loads(lines[-1][1].decode().removeprefix("data:"))
        return lines[0][0], lines[-1][0], last["details"]["finish_reason"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        spans = [(first, last) for first, last, reason in pool.map(stream, PROMPTS) if reason == "length"]
    # Batched, not one after another: a stream's tokens came while another's were coming. One after another,
    # no two of these intervals would overlap.
    overlapping = [a for a in spans if any(b is not a and a[0] < b[1] and b[0] < a[1] for b in spans)]
    assert len(spans) >= 4 and len(overlapping) >= 2, spans


def test_tgi_stream_event_by_event(server):
    body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 10, "details": True}, "stream": True}
    response = server.invoke(body, stream=True)
    events = sse_events(response)
    plain = generate(server, PROMPTS[1], max_new_tokens=10)
    assert len(events) == 10
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert [e["index"] for e in events] == list(range(1, 11))
    assert "".join(e["token"]["text"] for e in events) == plain["generated_text"] == events[-1]["generated_text"]
    assert all(isinstance(e["token"]["id"], int) and e["token"]["logprob"] <= 0 for e in events)
    assert events[-1]["details"]["generated_tokens"] == 10 and events[-1]["details"]["finish_reason"] == "length"


def test_chat_completion_and_its_stream(server):
    body = {"messages": [{"role": "system", "content": "You are Dana."}, {"role": "user", "content": PROMPTS[2]}],
            "max_tokens": 8, "temperature": 0}
    answer = server.invoke(body).json()
    assert answer["object"] == "chat.completion"
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("length", "stop")
    assert answer["usage"]["completion_tokens"] <= 8
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]

    events = sse_events(server.invoke({**body, "stream": True}, stream=True))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens: the second may hit the cache
    assert [chunks[-1]["usage"][k] for k in counts] == [answer["usage"][k] for k in counts]


def test_stop_sequence_ends_generation_and_stays_in_the_text(server):
    free = generate(server, PROMPTS[3], max_new_tokens=20)["generated_text"]
    stop = free[3:6]
    assert stop.strip(), free
    stopped = generate(server, PROMPTS[3], max_new_tokens=20, stop=[stop])
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stopped["generated_text"].endswith(stop) and free.startswith(stopped["generated_text"])


def test_details_counts_match_the_tokens(server):
    item = generate(server, "Hi", max_new_tokens=5, return_full_text=True)
    assert item["details"]["generated_tokens"] == 5
    assert item["generated_text"].startswith("Hi")
    assert item["details"]["input_length"] > 1


def test_jsonlines_batch_is_answered_line_for_line(server):
    lines = [json.dumps({"inputs": p, "parameters": {"max_new_tokens": 4}}) for p in PROMPTS[:3]]
    lines.insert(1, '{"inputs": 5}')
    response = server.invoke("\n".join(lines) + "\n", headers={"Content-Type": "application/jsonlines"})
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/jsonlines")
    answers = [json.loads(line) for line in response.text.splitlines()]
    assert len(answers) == 4
    assert answers[1]["error_type"] == "validation" and answers[1]["error"].startswith("line 2:")
    assert answers[0]["generated_text"] == generate(server, PROMPTS[0], max_new_tokens=4)["generated_text"]
    parameters = requests.get(server.url + "/execution-parameters", timeout=30).json()
    assert parameters == {"MaxConcurrentTransforms": 2, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 1}


@pytest.mark.scenario  # make test-scenarios, beside the soak on the same shared server
def test_ping_stays_fast_while_16_clients_stream(server):
    stop = threading.Event()
    latencies = []
    answers = []

    def client(i):
        while not stop.is_set():
            body = {"inputs": PROMPTS[i % 8], "parameters": {"max_new_tokens": 40}, "stream": True}
            response = server.invoke(body, stream=True)
            last = parse_sse(response.text)[-1]  # the whole stream, read to its end
            answers.append((response.status_code, last["generated_text"] is not None))

    with ThreadPoolExecutor(16) as pool:
        clients = [pool.submit(client, i) for i in range(16)]
        time.sleep(1.0)
        for _ in range(100):
            started = time.perf_counter()
            assert requests.get(server.url + "/ping", timeout=30).status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
        stop.set()
    for future in clients:
        future.result()  # a client that failed fails the test
    assert answers and all(answer == (200, True) for answer in answers), answers[:5]
    # Never starved: each ping answered, and most quickly (a /ping that waited behind the streams would take about
    # a stream's time, seconds here). The tail is the soak bench's to watch (bench/soak.py, make soak: p99 about
    # 40 ms on an idle machine), not a timed test's: with two busy loops beside this test the p90 reached 3.2 s
    # and the median 135 ms. That /ping never needs an HTTP thread: tests/contract/test_slow_clients.py.
    median = statistics.median(latencies)
    assert median < 1.0, f"/ping median {median * 1000:.1f} ms"
