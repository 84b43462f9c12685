"""The HTTP layer (serve/app.py) through Flask's test client, against an in-memory engine that implements
the app's Engine interface: routing, payload dialects, SSE encodings, errors, admission and the fault
policy, in milliseconds. What depends on vLLM is proven through real gunicorn + vLLM in tests/contract/."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from container.model_dir import ServingSpec
from serve.adapters import Adapters
from serve.admission import Admission
from serve.app import create_app
from serve.config import ServeConfig
from serve.custom import CustomHandlers
from serve.errors import ValidationError
from serve.placement import Placement
from serve.schemas import ADAPTER_HEADER, GenerateResult, Sequence
from serve.startup import Startup
from serve.translate import Limits
from tests.helpers import sse_events

JSONLINES = {"Content-Type": "application/jsonlines"}


class MemoryEngine:
    """Answers each request with the words of its prompt in capitals, one token per word, up to
    max_new_tokens (finish "length") or all of them (finish "eos_token"). `hold` keeps every request in
    flight until it is set; `fail_after` makes a stream fail after that many tokens."""

    def __init__(self, limit: int = 4):
        self.limits = Limits(max_input_tokens=50, max_total_tokens=80, default_max_new_tokens=16)
        self.admission = Admission(limit, exit_worker=lambda: None)
        self.state = "ready"
        self.dtype = "torch.float32"
        self.device_type = "cpu"
        self.hold = threading.Event()
        self.hold.set()
        self.fail_after: int | None = None
        self.loaded: list[str] = []
        self.versions: dict[int, tuple[str, bool]] = {}  # loaded_adapters(): version -> (name, pinned)
        self.admitted = 0

    @property
    def capacity(self) -> int:
        return self.admission.limit

    @property
    def in_flight(self) -> int:
        return self.admission.admitted

    def submit(self, request, wait=0.0):
        ticket = self.admission.ticket(request, wait)
        words = (request.messages[-1]["content"] if request.messages else request.inputs).split()
        if len(words) > self.limits.max_input_tokens:
            ticket.close()
            raise ValidationError(f"inputs must have less than {self.limits.max_input_tokens} tokens")
        self.admission.track(ticket)
        self.admitted += 1
        threading.Thread(target=self._generate, args=(ticket, request, words), daemon=True).start()
        return ticket

    def _generate(self, ticket, request, words):
        self.hold.wait()
        limit = request.params.max_new_tokens or self.limits.default_max_new_tokens
        answer = [w.upper() for w in words][:limit]
        tokens = []
        for i, word in enumerate(answer):
            if self.fail_after is not None and i == self.fail_after:
                ticket.emit("error", self.admission.fault(RuntimeError("boom"), "the request failed"))
                return
            tokens.append({"id": i, "text": " " + word, "logprob": -1.0, "special": False})
            if request.stream:
                ticket.emit("token", {"token": tokens[-1], "top_tokens": None})
        finish = "length" if len(words) > limit else "eos_token"
        best = Sequence("".join(t["text"] for t in tokens), finish, len(tokens), tokens)
        ticket.emit("done", GenerateResult(best, input_tokens=len(words), seed=None))

    def predict(self, data):
        raise AssertionError("not a predict_fn engine")

    @contextmanager
    def load_adapter(self, adapter):
        self.loaded.append(adapter.name)
        self.versions[adapter.number] = (adapter.name, adapter.pin)
        yield

    def unload_adapter(self, adapter):
        self.loaded.remove(adapter.name)
        self.versions.pop(adapter.number)

    def loaded_adapters(self):
        return dict(self.versions)

    def shutdown(self):
        pass


def startup(tmp_path: Path, custom: CustomHandlers | None = None, **env) -> Startup:
    config = ServeConfig.from_env({"SAGEMAKER_BASE_DIR": str(tmp_path), **env})
    spec = ServingSpec(base_model="tiny", max_input_tokens=50, max_total_tokens=80)
    return Startup(config, spec, custom, Placement(1, pin_gpus=False, span_gpus=False), gpus=0, fixed_adapters={},
                   lora_rank=64, adapter_registry=None)


@pytest.fixture
def engine():
    return MemoryEngine()


def test_client(engine, tmp_path: Path, start: Startup | None = None):
    """The app over `engine`, with the fixed adapter "dana" and a registry, started as `start` says."""
    (tmp_path / "registry").mkdir()
    adapters = Adapters({"dana": "/adapters/dana"}, tmp_path / "registry", max_rank=64, source_root=tmp_path)
    return create_app(engine, adapters, start or startup(tmp_path)).test_client()


test_client.__test__ = False  # a helper, not a test


@pytest.fixture
def client(engine, tmp_path):
    return test_client(engine, tmp_path)


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true within the deadline"
        time.sleep(0.01)


def post(client, body, route="/invocations", **kwargs):
    return client.post(route, data=json.dumps(body), content_type="application/json", **kwargs)


def test_ping_follows_the_engine_state(client, engine):
    engine.state = "loading"
    assert client.get("/ping").status_code == 503
    assert post(client, {"inputs": "hi"}).json == {"error": "model is loading", "error_type": "healthcheck"}
    engine.state = "ready"
    assert client.get("/ping").status_code == 200 and client.get("/ping").data == b""
    engine.state = "failed"
    assert client.get("/ping").status_code == 500 and client.get("/health").status_code == 500


def test_tgi_generate_answers_a_list_and_generate_answers_one_object(client):
    body = {"inputs": "write about evals", "parameters": {"max_new_tokens": 2, "details": True}}
    answer = post(client, body)
    assert answer.status_code == 200 and answer.content_type == "application/json"
    item = answer.json[0]
    assert item["generated_text"] == " WRITE ABOUT"
    assert item["details"]["finish_reason"] == "length" and item["details"]["generated_tokens"] == 2
    assert item["details"]["input_length"] == 3 and len(item["details"]["tokens"]) == 2
    assert post(client, body, "/generate").json == item
    full = post(client, {"inputs": "hi", "parameters": {"return_full_text": True}}).json[0]
    assert full == {"generated_text": "hi HI"}


def test_tgi_stream_holds_each_event_until_the_next_so_the_last_carries_the_text(client):
    body = {"inputs": "one two three", "parameters": {"details": True}, "stream": True}
    for response in (post(client, body), post(client, {**body, "stream": False}, "/generate_stream")):
        assert response.content_type.startswith("text/event-stream")
        events = sse_events(response.get_data(as_text=True))
        assert [e["index"] for e in events] == [1, 2, 3]
        assert [e["generated_text"] for e in events] == [None, None, " ONE TWO THREE"]
        assert events[-1]["details"] == {"finish_reason": "eos_token", "generated_tokens": 3, "input_length": 3,
                                         "seed": None}
        assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"]


def test_openai_chat_and_completions_whole_and_streamed(client):
    chat = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5, "temperature": 0}
    for route in ("/invocations", "/v1/chat/completions"):
        answer = post(client, chat, route).json
        assert answer["object"] == "chat.completion" and answer["model"] == "llm-twin"
        assert answer["choices"][0]["message"] == {"role": "assistant", "content": " HELLO THERE"}
        assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}  # no salt: no cache
        salted = post(client, {**chat, "cache_salt": "mine"}, route).json["usage"]
        assert salted["prompt_tokens_details"] == {"cached_tokens": 0}
    events = sse_events(post(client, {**chat, "stream": True}).get_data(as_text=True))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == " HELLO THERE"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] == 2
    completion = post(client, {"prompt": "a b c", "max_tokens": 2}, "/v1/completions").json
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == " A B"
    assert completion["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("data, content_type, status, error_type, message", [
    ("{not json", "application/json", 400, "bad_request", "request body is not valid JSON"),
    ('{"inputs": "x"}', "text/csv", 415, "unsupported_media_type", "Content-Type 'text/csv' is not supported"),
    ('{"inputs": 42}', "application/json", 422, "validation", "'inputs' must be a string"),
    ('{"inputs": "x", "parameters": {"max_new_token": 2}}', "application/json", 422, "validation",
     "did you mean 'max_new_tokens'"),
    pytest.param("[" * 100000 + "]" * 100000, "application/json", 400, "bad_request", "RecursionError", id="deep"),
    ('{"inputs": "' + "w " * 60 + '"}', "application/json", 422, "validation", "less than 50 tokens"),
])
def test_bad_requests_are_4xx_json_saying_what_is_wrong(client, data, content_type, status, error_type, message):
    response = client.post("/invocations", data=data, content_type=content_type)
    assert response.status_code == status and response.json["error_type"] == error_type
    assert message in response.json["error"]


@pytest.mark.parametrize("grammar, message", [
    ({"type": "regex", "value": "a{1,100000}"}, "may repeat at most 1000 times, got {1,100000}"),
    ({"type": "regex", "value": "a" * 20000}, "at most 16384 characters, got 20000"),
    ({"type": "json", "value": "[" * 5000}, "is not valid JSON: RecursionError"),
    ({"type": "json", "value": {"type": "array", "maxItems": 10**9}}, "maxItems may be at most 1000"),
    ({"type": "json", "value": {"properties": {"a": {"type": "string", "pattern": "x{99999}"}}}}, "repeat at most"),
    ({"type": "json", "value": "{}" + " " * 17000}, "at most 16384 characters"),
], ids=["regex-repeat", "regex-long", "schema-string-deep", "schema-count", "schema-pattern", "schema-long"])
def test_grammars_are_capped_before_the_engine_compiles_them(client, grammar, message):
    response = post(client, {"inputs": "x", "parameters": {"grammar": grammar}})
    assert response.status_code == 422 and message in response.json["error"], response.json


def test_a_deeply_nested_schema_is_refused_by_its_depth(client):
    schema = {}
    for _ in range(40):
        schema = {"type": "object", "properties": {"a": schema}}
    response = post(client, {"messages": [{"role": "user", "content": "x"}],
                             "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})
    assert response.status_code == 422 and "nest at most 32 levels" in response.json["error"]


def test_routes_and_sizes_outside_the_contract_are_json_errors(client):
    assert client.get("/nope").json["error_type"] == "not_found"
    assert client.get("/invocations").status_code == 405
    huge = client.post("/invocations", data=b'{"inputs": "' + b"a" * (6 * 2**20) + b'"}',
                       content_type="application/json")
    assert huge.status_code == 413 and huge.json["error"]


def test_admission_refuses_at_once_past_its_limit_and_frees_the_slot_when_the_answer_is_done(engine, client):
    engine.hold.clear()  # every request stays in flight
    results = []
    waiting = [threading.Thread(target=lambda: results.append(post(client, {"inputs": "slow"}))) for _ in range(4)]
    for thread in waiting:
        thread.start()
    wait_until(lambda: engine.admitted == 4)  # the four threads took the four slots
    refused = post(client, {"inputs": "one more"})
    assert refused.status_code == 429 and refused.json["error_type"] == "overloaded"
    assert "more than 4 requests in flight" in refused.json["error"]
    assert "llm_twin_requests_in_flight 4\n" in client.get("/metrics").get_data(as_text=True)
    engine.hold.set()
    for thread in waiting:
        thread.join(timeout=10)
    assert [r.status_code for r in results] == [200] * 4
    assert "llm_twin_requests_in_flight 0\n" in client.get("/metrics").get_data(as_text=True)
    assert post(client, {"inputs": "now"}).status_code == 200


def test_a_jsonlines_batch_waits_for_slots_instead_of_refusing_and_answers_line_for_line(tmp_path):
    engine = MemoryEngine(limit=1)
    client = create_app(engine, Adapters({}), startup(tmp_path)).test_client()
    lines = [json.dumps({"inputs": f"line {i}"}) for i in range(5)]
    lines.insert(2, '{"inputs": 5}')
    response = client.post("/invocations", data="\n".join(lines) + "\n", headers=JSONLINES)
    assert response.status_code == 200 and response.content_type.startswith("application/jsonlines")
    answers = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert [a.get("generated_text") for a in answers] == [" LINE 0", " LINE 1", None, " LINE 2", " LINE 3", " LINE 4"]
    assert answers[2]["error_type"] == "validation" and answers[2]["error"].startswith("line 3:")
    empty = client.post("/invocations", data="\n\n", headers=JSONLINES)
    assert empty.status_code == 422 and "no lines" in empty.json["error"]
    engine.admission.stop("the server is stopping: send the request again")  # SIGTERM's last seconds
    stopped = client.post("/invocations", data="\n".join(lines) + "\n", headers=JSONLINES)
    assert stopped.status_code == 503 and stopped.json["error_type"] == "unavailable"  # the body is sent again


def test_on_a_real_time_endpoint_a_jsonlines_body_holds_a_quarter_of_the_slots(tmp_path):
    """A batch transform job gives one body every slot; a real-time endpoint keeps the rest for other clients."""
    for env, most in (({}, 2), ({"SAGEMAKER_BATCH": "true"}, 8)):
        engine = MemoryEngine(limit=8)
        client = create_app(engine, Adapters({}), startup(tmp_path, **env)).test_client()
        engine.hold.clear()
        lines = "\n".join(json.dumps({"inputs": f"line {i}"}) for i in range(12))
        batch = threading.Thread(target=client.post, args=("/invocations",), daemon=True,
                                 kwargs={"data": lines, "headers": JSONLINES})
        batch.start()
        wait_until(lambda: engine.admitted == most)
        time.sleep(0.2)  # it takes no more while its lines are held
        assert engine.admitted == most and engine.capacity == 8
        if most < 8:
            other = threading.Thread(target=post, args=(client, {"inputs": "another client"}), daemon=True)
            other.start()
            wait_until(lambda: engine.admitted == most + 1)  # admitted, not refused with a 429
        engine.hold.set()
        batch.join(timeout=60)


def test_past_the_timeout_a_plain_request_is_a_424_naming_the_fixes(engine, tmp_path):
    client = create_app(engine, Adapters({}), startup(tmp_path, SAGEMAKER_MODEL_SERVER_TIMEOUT="1")).test_client()
    engine.hold.clear()
    slow = post(client, {"inputs": "slow"})
    engine.hold.set()
    assert slow.status_code == 424 and slow.json["error"].startswith("generation did not finish within 1 s")
    assert "stream the answer" in slow.json["error"]


def test_a_stream_that_fails_after_its_first_token_ends_with_an_error_event(engine, client):
    engine.fail_after = 2  # TGI's stream holds each token's event until the next: the first is sent, then the error
    events = sse_events(post(client, {"inputs": "one two three", "stream": True}).get_data(as_text=True))
    assert [e.get("token", {}).get("text") for e in events] == [" ONE", None]
    assert events[-1] == {"error": "the request failed: RuntimeError: boom", "error_type": "generation"}
    engine.fail_after = 0  # failing before the first token: a plain error answer, not a stream
    failed = post(client, {"inputs": "one two", "stream": True})
    assert failed.status_code == 424 and failed.json["error"] == "the request failed: RuntimeError: boom"


def test_info_models_metrics_and_execution_parameters(client, engine):
    info = client.get("/info").json
    assert (info["model_id"], info["max_input_tokens"], info["max_total_tokens"]) == ("tiny", 50, 80)
    assert info["adapters"] == ["dana"] and info["max_concurrent_requests"] == 128
    assert (info["model_dtype"], info["model_device_type"]) == ("torch.float32", "cpu")  # the engine's, not DTYPE's
    assert [m["id"] for m in client.get("/v1/models").json["data"]] == ["llm-twin", "dana"]
    post(client, {"inputs": "count me"})
    post(client, {"inputs": 5})
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "tgi_request_success 1\n" in metrics and "tgi_request_failure 1\n" in metrics
    assert "llm_twin_admission_limit 4\n" in metrics
    assert client.get("/execution-parameters").json == {"MaxConcurrentTransforms": 2, "BatchStrategy": "MULTI_RECORD",
                                                        "MaxPayloadInMB": 1}


def test_adapters_register_through_the_engine_and_unregister(client, engine, tmp_path):
    folder = tmp_path / "alice"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    registered = post(client, {"name": "alice", "src": str(folder)}, "/adapters")
    assert registered.status_code == 200 and registered.json == {"name": "alice", "src": str(folder), "pin": False,
                                                                 "preload": True, "message": "Adapter alice registered"}
    # without the header (the base component's callers): only LORA_ADAPTERS', never a registered component
    assert engine.loaded == ["alice"] and client.get("/info").json["adapters"] == ["dana"]
    as_alice = {ADAPTER_HEADER: "alice"}  # an inference component sees its own adapter's name only
    assert client.get("/info", headers=as_alice).json["adapters"] == ["alice"]
    assert [m["id"] for m in client.get("/v1/models", headers=as_alice).json["data"]] == ["llm-twin", "alice"]
    assert post(client, {"name": "bob", "src": str(folder)}, "/adapters").status_code == 200
    assert engine.loaded == ["alice", "bob"]
    missing = post(client, {"name": "x"}, "/adapters")
    assert missing.status_code == 400 and "needs src" in missing.json["error"]
    assert client.delete("/adapters/alice").status_code == 200 and engine.loaded == ["bob"]
    assert client.delete("/adapters/alice").status_code == 404


def test_adapter_registration_takes_only_a_json_body(client, engine, tmp_path):
    """A web page can POST a form or a query string to a container on localhost without asking; a JSON body
    it cannot send cross-origin unless the server agrees (CORS), and this one never does."""
    folder = tmp_path / "alice"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    fields = {"name": "alice", "src": str(folder)}
    for sent in (client.post("/adapters", query_string=fields),
                 client.post("/adapters", data=fields),  # an HTML form
                 client.post("/adapters", data=json.dumps(fields), content_type="text/plain")):
        assert sent.status_code == 415 and "takes a JSON body" in sent.json["error"], sent.json
    assert engine.loaded == [] and "Access-Control-Allow-Origin" not in client.options("/adapters").headers


def test_sagemakers_adapter_header_decides_and_a_body_naming_another_is_refused(client, engine):
    """An inference component's invocation carries its adapter in the header SageMaker sets; the body can
    repeat it, but never name another twin, and no answer lists the others."""
    header = {"X-Amzn-SageMaker-Adapter-Identifier": "alice"}
    seen = []
    submit = engine.submit
    engine.submit = lambda request, wait=0.0: seen.append((request.params.adapter_id, request.model)) or submit(
        request, wait)
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert post(client, {"inputs": "hi"}, headers=header).status_code == 200
    assert post(client, {"inputs": "hi", "parameters": {"adapter_id": "alice"}}, headers=header).status_code == 200
    assert post(client, {**chat, "model": "llm-twin"}, headers=header).status_code == 200
    assert post(client, {**chat, "model": "alice"}, "/v1/chat/completions", headers=header).status_code == 200
    assert seen == [("alice", "alice")] * 4
    for body, route in (({"inputs": "hi", "parameters": {"adapter_id": "bob"}}, "/invocations"),
                        ({**chat, "model": "bob"}, "/invocations"), ({**chat, "model": "dana"}, "/invocations"),
                        ({"inputs": "hi", "parameters": {"adapter_id": "dana"}}, "/generate"),
                        ({"prompt": "hi", "model": "bob"}, "/v1/completions")):
        refused = post(client, body, route, headers=header)
        assert refused.status_code == 403 and refused.json["error_type"] == "forbidden", (body, refused.json)
        assert "X-Amzn-SageMaker-Adapter-Identifier" in refused.json["error"]
        assert "bob" not in refused.json["error"] and "dana" not in refused.json["error"]
    lines = "\n".join(json.dumps(b) for b in ({"inputs": "a"}, {"inputs": "b", "parameters": {"adapter_id": "bob"}}))
    batch = client.post("/invocations", data=lines, headers={**JSONLINES, **header})
    answers = [json.loads(line) for line in batch.data.decode().splitlines()]
    assert "error" not in answers[0] and answers[1]["error_type"] == "forbidden"
    assert len(seen) == 5 and seen[-1] == ("alice", "alice")
    assert post(client, {"inputs": "hi", "parameters": {"adapter_id": "bob"}}).status_code == 200  # no header


def test_custom_input_and_output_fn_wrap_the_built_in_generation(engine, tmp_path):
    def input_fn(body, content_type):
        return {"inputs": body.decode(), "parameters": {"max_new_tokens": 2}}

    def output_fn(prediction, accept):
        return json.dumps({"answer": prediction[0]["generated_text"], "accept": accept})

    custom = CustomHandlers(tmp_path / "inference.py", {"input_fn": input_fn, "output_fn": output_fn})
    client = create_app(engine, Adapters({}), startup(tmp_path, custom)).test_client()
    answer = client.post("/invocations", data="one two three", content_type="text/plain",
                         headers={"Accept": "application/x-custom"})
    assert answer.status_code == 200 and answer.content_type.startswith("application/x-custom")
    assert json.loads(answer.data) == {"answer": " ONE TWO", "accept": "application/x-custom"}
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    with_charset = client.post("/invocations", data="one", content_type="text/plain",
                               headers={"Accept": "application/json; charset=utf-8"})
    assert with_charset.status_code == 200 and with_charset.content_type == "application/json; charset=utf-8"
    for accept in ("text/html,application/xhtml+xml", "*/*;q=0.8,text/html", "nonsense", "a/b; x=<script>"):
        refused = client.post("/invocations", data="one", content_type="text/plain", headers={"Accept": accept})
        assert refused.status_code == 406 and refused.json["error_type"] == "not_acceptable", accept


def test_custom_results_that_are_no_body_are_a_424_saying_what_was_returned(tmp_path):
    class Predicting(MemoryEngine):
        def predict(self, data):
            return {"set": {1, 2}, "nan": float("nan"), "dict": {"ok": True}}[data["give"]]

    def ask(client, give):
        return client.post("/invocations", json={"give": give})

    predict_only = CustomHandlers(tmp_path / "inference.py", {"predict_fn": None})
    client = create_app(Predicting(), Adapters({}), startup(tmp_path, predict_only)).test_client()
    assert ask(client, "dict").json == {"ok": True}
    for give, why in (("set", "TypeError: Object of type set"), ("nan", "ValueError: Out of range float")):
        refused = ask(client, give)
        assert refused.status_code == 424
        assert refused.json["error"].startswith(f"predict_fn's result is not JSON ({why}")
    as_is = CustomHandlers(tmp_path / "inference.py", {"predict_fn": None, "output_fn": lambda p, accept: p})
    client = create_app(Predicting(), Adapters({}), startup(tmp_path, as_is)).test_client()
    refused = ask(client, "dict")
    assert refused.status_code == 424 and refused.json["error"] == ("output_fn returned dict: it must return the "
                                                                    "body, str or bytes")
