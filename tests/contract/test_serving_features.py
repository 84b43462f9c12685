"""What vLLM brings behind the edge, through the real server: adapters per request, structured output,
TGI's own routes, truncate and seeds."""

import json
import re
import shutil
import time

import pytest
import requests

from container.cpu_features import cpu_dtype
from serve.schemas import ADAPTER_HEADER
from tests.helpers import Server, sse_events, wait_for_ping


def make_adapter(base, out, seed: int):
    """A LoRA adapter on the tiny model with random (non-zero) weights, so it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_server(tiny_served_model, tmp_path_factory):
    """The base of an inference-component endpoint, as SageMaker runs it: ENABLE_LORA, two workers (two
    engines), and two adapters served from the start (TGI's LORA_ADAPTERS)."""
    root = tmp_path_factory.mktemp("adapters")
    shutil.copytree(tiny_served_model / "model", root / "model")
    dana = make_adapter(root / "model", root / "dana", seed=1)
    sam = make_adapter(root / "model", root / "sam", seed=2)
    server = Server(root, LORA_ADAPTERS=f"dana={dana},sam={sam}", ENABLE_LORA="true",
                    SAGEMAKER_MODEL_SERVER_WORKERS="2")
    server.wait_ready(timeout=240)
    # /ping is one worker's answer: the other may still be loading. Ready once 40 pings in a row, each on a
    # new connection (which either worker may take), answer 200.
    deadline, in_a_row = time.monotonic() + 240, 0
    while in_a_row < 40:
        codes = wait_for_ping(server.url, 200, timeout=deadline - time.monotonic())
        in_a_row = in_a_row + 1 if len(codes) == 1 else 0  # 200 at the first try
    yield server, root
    server.stop_soon()


def answer(server, **parameters) -> str:
    body = {"inputs": "Write about lesson 3", "parameters": {"max_new_tokens": 8, **parameters}}
    response = server.invoke(body)
    assert response.status_code == 200, response.text
    return response.json()[0]["generated_text"]


def test_adapters_are_chosen_per_request_by_adapter_id_model_or_sagemaker_header(adapter_server):
    server, _ = adapter_server
    base, dana, sam = answer(server), answer(server, adapter_id="dana"), answer(server, adapter_id="sam")
    assert len({base, dana, sam}) == 3, (base, dana, sam)  # each adapter changes the answer
    header = server.invoke({"inputs": "Write about lesson 3", "parameters": {"max_new_tokens": 8}},
                           headers={"Content-Type": "application/json", ADAPTER_HEADER: "sam"})
    assert header.json()[0]["generated_text"] == sam
    chat = {"messages": [{"role": "user", "content": "Write about lesson 3"}], "max_tokens": 8, "temperature": 0}
    by_model = requests.post(server.url + "/v1/chat/completions", json={**chat, "model": "dana"}, timeout=60).json()
    assert by_model["choices"][0]["message"]["content"] == dana and by_model["model"] == "dana"
    models = requests.get(server.url + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["llm-twin", "dana", "sam"]
    response = server.invoke({"inputs": "x", "parameters": {"adapter_id": "dan"}})
    assert response.status_code == 422 and response.json()["error"] == "unknown adapter 'dan'"
    other = server.invoke({"inputs": "x", "parameters": {"adapter_id": "dana"}},
                          headers={"Content-Type": "application/json", ADAPTER_HEADER: "sam"})
    assert other.status_code == 403 and "dana" not in other.text  # SageMaker's header decides


def test_adapter_components_register_answer_on_every_worker_and_unregister(adapter_server):
    """SageMaker's adapter inference component: POST /adapters (a JSON body) with the
    folder it unpacked, then invocations carrying X-Amzn-SageMaker-Adapter-Identifier, then DELETE."""
    server, root = adapter_server
    alice = make_adapter(root / "model", root / "alice", seed=3)
    twin = root / "bob-twin"  # a model directory `train` wrote (adapter-only): its adapter/ is used
    make_adapter(root / "model", twin / "adapter", seed=4)
    base = answer(server)
    registered = requests.post(server.url + "/adapters", json={"name": "alice", "src": str(alice)}, timeout=60)
    assert registered.status_code == 200, registered.text
    assert requests.post(server.url + "/adapters", json={"name": "bob", "src": str(twin)},
                         timeout=60).status_code == 200

    def ask(adapter):
        response = server.invoke({"inputs": "Write about lesson 3", "parameters": {"max_new_tokens": 8}},
                                 headers={"Content-Type": "application/json", ADAPTER_HEADER: adapter})
        assert response.status_code == 200, response.text
        return response.json()[0]["generated_text"]

    try:  # each request on a new connection: gunicorn hands them to both workers, and each must know both adapters
        alices, bobs = {ask("alice") for _ in range(8)}, {ask("bob") for _ in range(8)}
        assert len(alices) == 1 and len(bobs) == 1 and len({base, *alices, *bobs}) == 3, (base, alices, bobs)
        info = requests.get(server.url + "/info", timeout=30).json()
        assert info["adapters"] == ["dana", "sam"]  # the base component's callers see LORA_ADAPTERS' only
        alices_info = requests.get(server.url + "/info", headers={ADAPTER_HEADER: "alice"}, timeout=30).json()
        assert alices_info["adapters"] == ["alice"]
        # the base component's callers cannot reach a registered component through the body
        by_body = server.invoke({"inputs": "x", "parameters": {"adapter_id": "alice"}})
        assert by_body.status_code == 422 and by_body.json()["error"] == "unknown adapter 'alice'"
        assert info["model_dtype"] == f"torch.{cpu_dtype()}"  # DTYPE=auto as vLLM resolved it on this CPU
        assert info["model_device_type"] == "cpu"  # vLLM's platform, as TGI says it
        assert requests.delete(server.url + "/adapters/alice", timeout=60).status_code == 200
        gone = server.invoke({"inputs": "x"}, headers={"Content-Type": "application/json", ADAPTER_HEADER: "alice"})
        assert gone.status_code == 422 and gone.json()["error"] == "unknown adapter 'alice'"
        assert requests.delete(server.url + "/adapters/alice", timeout=60).status_code == 404
    finally:  # the module's other tests see the adapters the server started with
        for name in ("alice", "bob"):
            requests.delete(server.url + f"/adapters/{name}", timeout=60)


def test_a_bad_adapter_registration_is_a_clear_4xx(adapter_server):
    server, root = adapter_server
    empty = root / "empty"
    empty.mkdir()
    cases = [({"name": "x"}, 400, "registering an adapter needs src"),
             ({"name": "x", "src": "s3://b/a.tar.gz"}, 422, "must be a local absolute path"),
             ({"name": "x", "src": str(empty)}, 422, "holds no adapter_config.json"),
             ({"name": "../x", "src": str(empty)}, 400, "adapter name '../x' is not valid"),
             ({"name": "dana", "src": str(empty)}, 400, "adapter 'dana' is already served from LORA_ADAPTERS"),
             ({"name": "llm-twin", "src": str(empty)}, 400, "is reserved"),
             ({"name": "x", "src": "/etc"}, 422, "must be a folder under"),
             ({"name": "x", "src": "/no/such/folder"}, 422, "must be a folder under")]
    for body, status, message in cases:
        response = requests.post(server.url + "/adapters", json=body, timeout=30)
        assert response.status_code == status and message in response.json()["error"], (body, response.text)
    wide = make_adapter(root / "model", root / "wide", seed=5)
    config = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**config, "r": 128}))
    response = requests.post(server.url + "/adapters", json={"name": "wide", "src": str(wide)}, timeout=30)
    assert response.status_code == 422 and "MAX_LORA_RANK=64" in response.json()["error"], response.text


def test_regex_and_json_schema_grammars_constrain_the_output(server):
    digits = answer(server, grammar={"type": "regex", "value": "[0-9]{3}-[a-c]{2}"}, max_new_tokens=12)
    assert re.fullmatch("[0-9]{3}-[a-c]{2}", digits), digits
    schema = {"type": "object", "properties": {"level": {"type": "integer", "minimum": 1, "maximum": 5},
                                               "tone": {"enum": ["warm", "dry"]}},
              "required": ["level", "tone"], "additionalProperties": False}
    body = {"messages": [{"role": "user", "content": "Rate it"}], "max_tokens": 60, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "rating", "schema": schema}}}
    content = server.invoke(body).json()["choices"][0]["message"]["content"]
    parsed = json.loads(content)
    assert set(parsed) == {"level", "tone"} and 1 <= parsed["level"] <= 5 and parsed["tone"] in ("warm", "dry")


def test_tgi_routes_answer_with_the_same_handlers(server):
    body = {"inputs": "Write about evals", "parameters": {"max_new_tokens": 4, "details": True}}
    via_invocations = server.invoke(body).json()[0]
    generate = requests.post(server.url + "/generate", json=body, timeout=60).json()
    assert generate == via_invocations  # TGI's /generate answers one object, not a list
    stream = requests.post(server.url + "/generate_stream", json=body, timeout=60)
    last = sse_events(stream.text)[-1]
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    assert last["generated_text"] == via_invocations["generated_text"]
    info = requests.get(server.url + "/info", timeout=30).json()
    assert info["max_total_tokens"] == 512 and info["max_input_tokens"] == 400 and info["max_best_of"] >= 2
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    metrics = requests.get(server.url + "/metrics", timeout=30)
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert re.search(r"^tgi_request_success \d+$", metrics.text, re.M) and "tgi_request_count" in metrics.text


def test_truncate_keeps_the_last_input_tokens_inside_the_chat_template(server):
    long = "one two three four five six seven eight nine ten " * 5
    body = {"inputs": long, "parameters": {"max_new_tokens": 1, "details": True, "decoder_input_details": True}}
    full = server.invoke(body).json()[0]["details"]
    cut = server.invoke({**body, "parameters": {**body["parameters"], "truncate": 4}}).json()[0]["details"]
    assert cut["input_length"] < full["input_length"]
    prompt = "".join(token["text"] for token in cut["prefill"])
    assert prompt.startswith("<|im_start|>user\n")  # the template's header is kept, the inputs' head is cut
    kept = prompt.removeprefix("<|im_start|>user\n").split("<|im_end|>")[0]
    assert kept and long.endswith(kept) and len(kept) < 20, kept


def test_sampling_without_a_seed_reports_the_seed_that_reproduces_it(server):
    first = server.invoke({"inputs": "Hello",
                           "parameters": {"max_new_tokens": 8, "do_sample": True, "details": True}}).json()[0]
    seed = first["details"]["seed"]
    assert isinstance(seed, int)
    again = server.invoke({"inputs": "Hello",
                           "parameters": {"max_new_tokens": 8, "do_sample": True, "seed": seed}}).json()[0]
    assert again["generated_text"] == first["generated_text"]


@pytest.mark.parametrize("route,body,message", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 2, "temperature": 0}, "greedy"),
    ("/invocations", {"inputs": "Hi", "parameters": {"temperature": 5.0}}, "temperature"),
    ("/v1/chat/completions", {"model": "llm-twin"}, "'messages' must be a non-empty array"),
    ("/invocations", {"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "(["}}}, "regex"),
])
def test_what_vllm_refuses_is_a_422_naming_it_never_a_500(server, route, body, message):
    response = requests.post(server.url + route, json=body, timeout=60)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"].lower() or message in response.json()["error"]


def test_streamed_events_carry_top_tokens_when_asked(server):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "top_n_tokens": 2}, "stream": True}
    events = sse_events(server.invoke(body).text)
    assert len(events) == 3 and all(len(e["top_tokens"]) == 2 for e in events)
