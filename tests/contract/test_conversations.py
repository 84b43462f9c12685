"""Conversations with real gunicorn + vLLM (the shared tiny-model server, which keeps sessions): SageMaker's
stateful sessions over HTTP, and its bidirectional streaming as a WebSocket, driven by the `websockets`
client library. The HTTP layer's edge cases (locks, expiry, bounds, adapters) are in tests/unit/test_sessions.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from datetime import datetime, timezone

import pytest
import requests
from websockets.sync.client import connect

from serve.sessions import CLOSED_SESSION_HEADER, NEW_SESSION_HEADER, SESSION_HEADER
from tests.helpers import frozen, process_tree, running, sse_events, wait_for_ping

JSON = {"Content-Type": "application/json"}
NEW_SESSION_VALUE = re.compile(r"([0-9a-f-]{36}); Expires=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")


def open_session(server) -> str:
    opened = server.invoke({"requestType": "NEW_SESSION"})
    assert opened.status_code == 200, opened.text
    session_id, expires = NEW_SESSION_VALUE.fullmatch(opened.headers[NEW_SESSION_HEADER]).groups()
    left = datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp() - time.time()
    assert 1100 < left <= 1201  # SAGEMAKER_SESSIONS_EXPIRATION's default, 20 minutes
    assert opened.json() == {"session_id": session_id, "expires": expires}
    return session_id


def turn(server, session_id: str, body: dict) -> requests.Response:
    return server.invoke(body, headers={**JSON, SESSION_HEADER: session_id})


def prompt_ids(answer: dict) -> list[int]:
    return [token["id"] for token in answer["details"]["prefill"]]


def test_a_session_continues_its_conversation_and_each_prompt_extends_the_last(server):
    session_id = open_session(server)
    details = {"max_new_tokens": 6, "details": True, "decoder_input_details": True}
    first = turn(server, session_id, {"inputs": "My name is Ada.", "parameters": details})
    assert first.status_code == 200, first.text
    second = turn(server, session_id, {"inputs": "What is my name?", "parameters": details})
    assert second.status_code == 200, second.text
    first, second = first.json()[0], second.json()[0]
    # The second prompt is the first prompt, the first answer and the new turn: vLLM's prefix cache holds the
    # first prompt's blocks. (The answer is tokenized again from its text; for this random model's byte soup
    # that can differ from the tokens it generated, for real text it does not: bench/conversations.py.)
    assert prompt_ids(second)[:len(prompt_ids(first))] == prompt_ids(first)
    second_prompt = "".join(token["text"] for token in second["details"]["prefill"])
    assert "My name is Ada." in second_prompt
    assert second_prompt.rstrip().endswith("What is my name?<|im_end|>\n<|im_start|>assistant")

    # An OpenAI turn, streamed: recorded once its stream ends, so the next turn's prompt holds it.
    streamed = turn(server, session_id, {"messages": [{"role": "user", "content": "Say it again."}],
                                         "max_tokens": 4, "stream": True})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    said = "".join(event["choices"][0]["delta"].get("content") or "" for event in sse_events(streamed.text)[:-1])
    third = turn(server, session_id, {"inputs": "Thanks.", "parameters": details}).json()[0]
    third_prompt = "".join(token["text"] for token in third["details"]["prefill"])
    recorded = re.search(r"Say it again\.<\|im_end\|>\n<\|im_start\|>assistant\n(.+?)<\|im_end\|>", third_prompt,
                         re.S)
    assert said and recorded and prompt_ids(third)[:len(prompt_ids(second))] == prompt_ids(second)

    closed = server.invoke({"requestType": "CLOSE"}, headers={**JSON, SESSION_HEADER: session_id})
    assert closed.status_code == 200 and closed.headers[CLOSED_SESSION_HEADER] == session_id
    after = turn(server, session_id, {"inputs": "Still there?"})
    assert after.status_code == 400 and after.json()["error"].startswith(f"session not found: {session_id}")


def test_session_requests_that_cannot_be_served_are_4xx(server):
    unknown = turn(server, "00000000-0000-4000-8000-000000000000", {"inputs": "Hi"})
    assert unknown.status_code == 400 and "session not found" in unknown.json()["error"]
    forged = turn(server, "../../etc/passwd", {"inputs": "Hi"})
    assert forged.status_code == 400 and "not a session id this endpoint gave" in forged.json()["error"]
    no_id = server.invoke({"requestType": "CLOSE"})
    assert no_id.status_code == 400 and SESSION_HEADER in no_id.json()["error"]
    extra = server.invoke({"requestType": "NEW_SESSION", "inputs": "Hi"})
    assert extra.status_code == 400 and "nothing else" in extra.json()["error"]
    session_id = open_session(server)
    several = turn(server, session_id, {"inputs": "Hi", "parameters": {"best_of": 2, "do_sample": True}})
    assert several.status_code == 422 and "one answer" in several.json()["error"]


def cached_tokens(answer: requests.Response) -> int:
    assert answer.status_code == 200, answer.text
    return answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_sessions_cached_prefixes_are_its_own_and_a_cache_salt_keeps_a_callers_apart(server):
    """vLLM's prefix cache (128-token blocks on the CPU) as OpenAI's usage reports it for a salted request: a
    repeated prompt is served from the cache with its own salt only; a session salts its turns with itself, so
    its next turn reuses its blocks and no other request's, salted or not."""
    words = " ".join(f"note {i} about the garden and the river" for i in range(15))
    chat = {"messages": [{"role": "user", "content": f"{uuid.uuid4().hex} {words}"}], "max_tokens": 1,
            "temperature": 0}
    plain = server.invoke(chat)  # unsalted: its blocks are cached for unsalted prompts, and no count is told
    assert 130 < plain.json()["usage"]["prompt_tokens"] < 256, plain.text  # one full block: a turn more fits
    assert "prompt_tokens_details" not in plain.json()["usage"]
    salted = {**chat, "cache_salt": uuid.uuid4().hex}
    assert cached_tokens(server.invoke(salted)) == 0  # not the unsalted blocks
    assert cached_tokens(server.invoke(salted)) >= 128  # but its own: caching works here
    mine, theirs = open_session(server), open_session(server)
    assert cached_tokens(turn(server, mine, chat)) == 0  # the same prompt, in a session: salted with it
    assert cached_tokens(turn(server, theirs, chat)) == 0  # nor does another session see this one's blocks
    assert cached_tokens(turn(server, mine, {**chat, "messages": [{"role": "user", "content": "And?"}]})) >= 128


def bidirectional(server, **headers):
    return connect(f"ws://127.0.0.1:{server.port}/invocations-bidirectional-stream", open_timeout=60,
                   additional_headers=headers)


def receive_answer(websocket, last, binary: bool = False) -> list:
    """Messages until the one `last` says ends the answer; each a text frame, or a binary one if `binary`."""
    messages = []
    while True:
        data = websocket.recv(timeout=120)
        assert isinstance(data, bytes if binary else str)
        text = data.decode() if binary else data
        messages.append(text if text == "[DONE]" else json.loads(text))
        if last(messages[-1]):
            return messages


def one_in_flight(server, seconds: float = 10) -> bool:
    """Whether the server has an answer in flight, asked for up to `seconds` (between two answers of a
    connection none is, for a moment)."""
    deadline = time.monotonic() + seconds
    while metric(server, "llm_twin_requests_in_flight") == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def tgi_done(message) -> bool:
    return "error" in message or message.get("generated_text") is not None


def test_bidirectional_stream_answers_many_turns_in_each_dialect(server):
    body = {"inputs": "Write about streaming", "parameters": {"max_new_tokens": 8}}
    plain = server.invoke(body).json()[0]["generated_text"]
    with bidirectional(server) as websocket:
        websocket.ping().wait(timeout=30)  # ping frames are answered
        websocket.send(json.dumps(body))  # streamed by default over the WebSocket
        events = receive_answer(websocket, tgi_done)
        assert "".join(event["token"]["text"] for event in events) == plain == events[-1]["generated_text"]

        websocket.send("{not json")  # a bad message is answered, and the connection stays open
        error = json.loads(websocket.recv(timeout=60))
        assert error["error_type"] == "bad_request" and "not valid JSON" in error["error"]
        websocket.send(json.dumps({"messages": [{"role": "user", "content": "Hi"}], "n": 2}))  # can't stream
        error = json.loads(websocket.recv(timeout=60))["error"]
        assert error.startswith("'n' > 1 is not supported") and 'streams unless it says "stream": false' in error

        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
        websocket.send(json.dumps(chat).encode())  # binary in, binary out
        chunks = receive_answer(websocket, lambda m: m == "[DONE]" or "error" in m, binary=True)
        assert chunks[-1] == "[DONE]" and chunks[0]["object"] == "chat.completion.chunk"

        text = json.dumps({**body, "stream": False})  # one message: the answer as HTTP has it
        websocket.send([text[:10], text[10:]])  # in two frames, as SageMaker sends PARTIAL then COMPLETE parts
        assert json.loads(websocket.recv(timeout=120)) == [{"generated_text": plain}]


def test_bidirectional_stream_keeps_a_session_and_leaving_aborts_the_generation(server):
    upgrades = open_session(server)  # named by the upgrade request: the connection's session until it opens one
    with bidirectional(server, **{SESSION_HEADER: upgrades}) as websocket:
        websocket.send(json.dumps({"requestType": "NEW_SESSION"}))
        session_id = json.loads(websocket.recv(timeout=60))["session_id"]
        websocket.send(json.dumps({"inputs": "My name is Ada.", "parameters": {"max_new_tokens": 3}}))
        receive_answer(websocket, tgi_done)
        websocket.send(json.dumps({"inputs": "Name?", "stream": False,
                                   "parameters": {"max_new_tokens": 2, "decoder_input_details": True,
                                                  "details": True}}))
        answer = json.loads(websocket.recv(timeout=120))[0]
        assert "My name is Ada." in "".join(token["text"] for token in answer["details"]["prefill"])
        websocket.send(json.dumps({"requestType": "CLOSE"}))
        assert json.loads(websocket.recv(timeout=60)) == {"session_id": session_id, "closed": True}
    untouched = server.invoke({"inputs": "Name?", "parameters": {"max_new_tokens": 2, "details": True,
                                                                 "decoder_input_details": True}},
                              headers={**JSON, SESSION_HEADER: upgrades}).json()[0]
    assert "Ada" not in "".join(token["text"] for token in untouched["details"]["prefill"])

    def gone() -> int:
        return metric(server, r'llm_twin_responses_total\{status="499"\}')

    before, engines = gone(), server.engines()
    for _ in range(3):
        with bidirectional(server) as websocket:
            for _ in range(4):  # answered one after the other
                websocket.send(json.dumps({"inputs": "Go on", "parameters": {"max_new_tokens": 400}}))
            first = websocket.recv(timeout=120)  # the first token: generating
            with frozen(engines):  # no answer can finish now, however slow the machine
                if one_in_flight(server):  # and it cannot finish
                    websocket.socket.shutdown(socket.SHUT_RDWR)  # leaves mid-answer, without a closing handshake
                    break
    else:
        pytest.fail("three times, the four answers had all been sent before the engine was frozen")
    deadline = time.monotonic() + 60
    while gone() == before:  # noticed at its next message: the generation is given up
        assert time.monotonic() < deadline, f"the server never noticed the client had left; it had sent {first}"
        time.sleep(0.2)


def test_leaving_during_a_plain_answer_aborts_it_and_records_nothing_in_its_session(server):
    """A plain answer sends nothing until it is whole: the server notices the connection closing meanwhile."""
    before, engines = metric(server, r'llm_twin_responses_total\{status="499"\}'), server.engines()
    with bidirectional(server) as websocket:
        websocket.send(json.dumps({"requestType": "NEW_SESSION"}))
        session_id = json.loads(websocket.recv(timeout=60))["session_id"]
        with frozen(engines):  # the answer cannot end before the client leaves, however slow the machine
            websocket.send(json.dumps({"inputs": "Remember the word heliotrope.", "stream": False,
                                       "parameters": {"max_new_tokens": 400}}))
            wait_until(lambda: metric(server, "llm_twin_requests_in_flight") == 1, "the turn was never admitted")
            websocket.socket.shutdown(socket.SHUT_RDWR)  # gone, without a closing handshake
            wait_until(lambda: metric(server, r'llm_twin_responses_total\{status="499"\}') == before + 1,
                       "the server never noticed the client had left")
            assert metric(server, "llm_twin_requests_in_flight") == 0  # given up while the engine was frozen
    turn = server.invoke({"inputs": "Which word?", "parameters": {"max_new_tokens": 2, "details": True,
                                                                  "decoder_input_details": True}},
                         headers={**JSON, SESSION_HEADER: session_id})
    assert turn.status_code == 200, turn.text  # the left turn's lock was let go
    prompt = "".join(token["text"] for token in turn.json()[0]["details"]["prefill"])
    assert "Which word?" in prompt and "heliotrope" not in prompt  # and its answer never recorded


def test_an_sse_stream_left_before_its_first_event_is_aborted(server):
    """Nothing is written to a stream's client before its first event: its leaving is watched until then."""
    before, engines = metric(server, r'llm_twin_responses_total\{status="499"\}'), server.engines()
    body = json.dumps({"inputs": "Go on", "stream": True, "parameters": {"max_new_tokens": 400}}).encode()
    with frozen(engines):  # no first token can come, however slow the machine
        client = socket.create_connection(("127.0.0.1", server.port))
        client.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: metric(server, "llm_twin_requests_in_flight") == 1, "the stream was never admitted")
        client.close()
        wait_until(lambda: metric(server, r'llm_twin_responses_total\{status="499"\}') == before + 1,
                   "the server never noticed the stream's client had left")
        assert metric(server, "llm_twin_requests_in_flight") == 0  # its slot is free while the engine is frozen


def metric(server, name: str) -> int:
    """A counter or gauge of the server's /metrics (0 when it has no such line yet); `name` is a regex."""
    found = re.search(rf"^{name} (\d+)$", requests.get(server.url + "/metrics", timeout=30).text, re.M)
    return int(found.group(1)) if found else 0


def wait_until(condition, failure: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.2)


@pytest.mark.scenario
def test_a_session_outlives_its_worker(serve_tree, tiny_served_model):
    """The worker that answered turn 1 is killed (as the OOM killer would); gunicorn starts another, with a
    new vLLM engine and an empty KV cache, and turn 2 still continues the conversation: sessions live in the
    folder the workers share, not in a worker."""
    server = serve_tree(tiny_served_model, DTYPE="float32", SAGEMAKER_ENABLE_STATEFUL_SESSIONS="true")
    session_id = open_session(server)
    assert turn(server, session_id, {"inputs": "My name is Ada.", "parameters": {"max_new_tokens": 3}}).ok
    workers = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 1
    engine_processes = process_tree(int(workers[0]))[1:]
    assert engine_processes
    os.kill(int(workers[0]), signal.SIGKILL)
    wait_for_ping(server.url, 503, 60)  # the new worker is loading
    server.wait_ready()
    left = [pid for pid in engine_processes if running(pid)]
    assert not left, "the killed worker's vLLM engine processes outlived it, holding its memory"
    details = {"max_new_tokens": 2, "details": True, "decoder_input_details": True}
    second = turn(server, session_id, {"inputs": "Name?", "parameters": details})
    assert second.status_code == 200, second.text
    assert "My name is Ada." in "".join(token["text"] for token in second.json()[0]["details"]["prefill"])
