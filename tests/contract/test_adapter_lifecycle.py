"""SageMaker's adapter contract beyond registering one, through real gunicorn + vLLM: pin and preload at
MAX_LORAS, a twin registered again while a stream runs on its old version, and a name that is not there.
One worker, so that GET /adapters (this worker's engine) tells the whole state. A scenario (make
test-scenarios; CI runs both): its own server and a 240-token stream cost about 40 s, and make test's registering,
choosing and refusing of adapters is tests/contract/test_serving_features.py's; the cache's rules are unit-tested
in tests/unit/test_lora_cache.py."""

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from serve.schemas import ADAPTER_HEADER
from tests.contract.test_serving_features import make_adapter
from tests.helpers import Server

pytestmark = pytest.mark.scenario
PROMPT = "Write about lesson 3"


@pytest.fixture(scope="module")
def lifecycle(tiny_served_model, tmp_path_factory):
    """ENABLE_LORA with room for three adapters in the engine; float32, so that an answer does not depend on
    what it was batched with."""
    root = tmp_path_factory.mktemp("lifecycle")
    shutil.copytree(tiny_served_model / "model", root / "model")
    server = Server(root, ENABLE_LORA="true", MAX_LORAS="3", DTYPE="float32", SAGEMAKER_MODEL_SERVER_WORKERS="1")
    server.wait_ready(timeout=240)
    yield server, root
    server.stop_soon()


def register(server, name, src, **fields):
    response = requests.post(server.url + "/adapters", json={"name": name, "src": str(src), **fields}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def ask(server, adapter, max_new_tokens=8) -> str:
    response = server.invoke({"inputs": PROMPT, "parameters": {"max_new_tokens": max_new_tokens}},
                             headers={"Content-Type": "application/json", ADAPTER_HEADER: adapter})
    assert response.status_code == 200, response.text
    return response.json()[0]["generated_text"]


def engine_state(server) -> dict:
    rows = requests.get(server.url + "/adapters", timeout=30).json()["adapters"]
    return {row["name"]: (row["loaded"], row["pinned"]) for row in rows}


def test_a_pinned_adapter_stays_at_max_loras_while_the_others_go_least_recently_used_first(lifecycle):
    server, root = lifecycle
    folders = {name: make_adapter(root / "model", root / name, seed=seed) for seed, name in enumerate("pabcd", 10)}
    try:
        register(server, "p", folders["p"], pin=True)
        register(server, "a", folders["a"])
        register(server, "b", folders["b"])  # preloaded (AWS's default): the engine's three places are full
        assert engine_state(server) == {"p": (True, True), "a": (True, False), "b": (True, False)}
        first_a = ask(server, "a")  # a is now used more recently than b
        register(server, "c", folders["c"])
        assert engine_state(server) == {"p": (True, True), "a": (True, False), "b": (False, False), "c": (True, False)}
        ask(server, "b")  # loaded again at its request: out goes a, the least recently used
        assert engine_state(server) == {"p": (True, True), "a": (False, False), "b": (True, False), "c": (True, False)}
        assert ask(server, "a") == first_a  # reloaded from its folder, it answers as before; out goes c
        assert engine_state(server) == {"p": (True, True), "a": (True, False), "b": (True, False), "c": (False, False)}
        register(server, "d", folders["d"], preload=False)  # not loaded until asked: nothing evicted
        assert engine_state(server)["d"] == (False, False) and engine_state(server)["a"] == (True, False)
        assert ask(server, "p") != first_a
        register(server, "q", folders["d"], pin=True)  # two pinned of MAX_LORAS=3 ...
        third = requests.post(server.url + "/adapters", json={"name": "r", "src": str(folders["d"]), "pin": True},
                              timeout=60)  # ... and a third would leave no place for all the others
        assert third.status_code == 422 and third.json()["error"].startswith("pin: this endpoint keeps at most 2"), \
            third.text
        typo = requests.post(server.url + "/adapters", json={"name": "r", "src": str(folders["d"]), "pin": "yes"},
                             timeout=60)
        assert typo.status_code == 400 and "'pin' must be true or false" in typo.json()["error"], typo.text
        assert "r" not in engine_state(server)
    finally:
        for name in ("p", "a", "b", "c", "d", "q"):
            requests.delete(server.url + f"/adapters/{name}", timeout=60)


def test_a_twin_registered_again_is_replaced_in_place_and_a_stream_on_the_old_one_finishes_on_it(lifecycle):
    server, root = lifecycle
    versions = [make_adapter(root / "model", root / f"twin-{seed}", seed=seed) for seed in (21, 22)]
    try:
        for attempt in range(3):  # the stream must outlast the new version's first answer: a loaded machine
            old, new = versions[attempt % 2], versions[(attempt + 1) % 2]  # can let it end first; then again
            short_on_new, overlapped = replace_during_a_stream(server, old, new)
            if overlapped:
                break
        assert overlapped, "the stream ended before the new version answered, every time: nothing overlapped"
        deadline = time.monotonic() + 30  # unloaded once nothing uses it (the engine looks once a second)
        while requests.get(server.url + "/adapters", timeout=30).json()["adapters"][0]["older_versions_loaded"]:
            assert time.monotonic() < deadline, "the old version is still loaded"
            time.sleep(0.2)
        assert ask(server, "twin") == short_on_new
    finally:
        requests.delete(server.url + "/adapters/twin", timeout=60)


def replace_during_a_stream(server, old: Path, new: Path) -> tuple[str, bool]:
    """Register `old` as "twin", start a long stream on it, register `new` under the same name and ask it:
    the stream finishes whole on `old` and the next request answers on `new`. Returns that answer and
    whether the stream was still running when it came."""
    register(server, "twin", old)
    long = {"inputs": PROMPT, "parameters": {"max_new_tokens": 480}}  # seconds on the tiny model
    headers = {"Content-Type": "application/json", ADAPTER_HEADER: "twin"}
    whole_on_old = server.invoke(long, headers=headers).json()[0]["generated_text"]
    short_on_old = ask(server, "twin")
    streamed, ended = [], threading.Event()
    stream = requests.post(server.url + "/invocations", data=json.dumps({**long, "stream": True}), headers=headers,
                           stream=True, timeout=120)
    lines = stream.iter_lines()
    first = next(line for line in lines if line)  # the stream runs on the old version

    def read_to_the_end():
        for line in lines:
            if line:
                streamed.append(json.loads(line[len(b"data:"):]))
        ended.set()

    reader = threading.Thread(target=read_to_the_end, daemon=True)
    reader.start()
    register(server, "twin", new)
    short_on_new = ask(server, "twin")  # the next request: the new version
    overlapped = not ended.is_set()
    reader.join(timeout=120)
    events = [json.loads(first[len(b"data:"):]), *streamed]
    assert events[-1]["generated_text"] == whole_on_old  # the stream finished on the old version, whole
    assert short_on_new != short_on_old, short_on_new
    return short_on_new, overlapped


def test_a_twin_retrained_into_the_same_folder_answers_from_its_new_weights_not_cached_ones(lifecycle):
    """Registered again from the same folder, a new version must not reuse the prefix-cache KV its old
    version computed for a prompt (vLLM keys that cache on the LoRA's name and folder)."""
    server, root = lifecycle
    folder, retrained = root / "twin-in-place", make_adapter(root / "model", root / "twin-42", seed=42)
    make_adapter(root / "model", folder, seed=41)
    prompt = "Write about lesson 3, and what it taught you. " * 12  # several of the KV cache's blocks
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 8}}

    def answer(adapter):
        response = server.invoke(body, headers={"Content-Type": "application/json", ADAPTER_HEADER: adapter})
        assert response.status_code == 200, response.text
        return response.json()[0]["generated_text"]

    try:
        register(server, "twin", folder)
        before = answer("twin")  # the prompt's KV, computed with the first weights, is now in the cache
        register(server, "reference", retrained)
        expected = answer("reference")
        shutil.rmtree(folder)
        shutil.copytree(retrained, folder)  # a retraining written over the first
        register(server, "twin", folder)
        assert answer("twin") == expected != before
    finally:
        for name in ("twin", "reference"):
            requests.delete(server.url + f"/adapters/{name}", timeout=60)


def test_a_name_that_is_not_registered_is_a_4xx_never_the_base_models_answer(lifecycle):
    server, root = lifecycle
    base = server.invoke({"inputs": PROMPT, "parameters": {"max_new_tokens": 8}}).json()[0]["generated_text"]
    register(server, "gone", make_adapter(root / "model", root / "gone", seed=31))
    assert ask(server, "gone") != base
    assert requests.delete(server.url + "/adapters/gone", timeout=60).status_code == 200
    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "temperature": 0}
    for route, body, headers in (
            ("/invocations", {"inputs": PROMPT, "parameters": {"adapter_id": "gone"}}, {}),
            ("/v1/chat/completions", {**chat, "model": "gone"}, {}),
            ("/v1/chat/completions", {**chat, "model": "gpt-4o"}, {}),
            ("/invocations", {"inputs": PROMPT}, {ADAPTER_HEADER: "gone"})):
        response = requests.post(server.url + route, json=body, headers=headers, timeout=60)
        assert response.status_code == 422 and response.json()["error_type"] == "validation", (route, response.text)
