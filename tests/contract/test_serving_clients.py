"""Clients and hostile input against the real server: the SageMaker SDK's local runtime client, TGI's and
Hugging Face's and OpenAI's Python clients, a property-based fuzz of request bodies, and quantization settings."""

import json
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import BIN


def test_sagemaker_sdk_local_runtime_client_gets_an_answer(server):
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    from sagemaker.local.local_session import LocalSagemakerRuntimeClient

    client = LocalSagemakerRuntimeClient(config={"local": {"serving_port": server.port}})
    body = {"inputs": "Write about evals", "parameters": {"max_new_tokens": 5, "return_full_text": False}}
    response = client.invoke_endpoint(Body=json.dumps(body), EndpointName="local", ContentType="application/json",
                                      Accept="application/json", CustomAttributes="trace=1")
    answer = json.loads(response["Body"].read())
    assert isinstance(answer, list) and answer[0]["generated_text"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
parameter_names = st.sampled_from(["max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "do_sample",
                                   "stop", "stop_sequences", "seed", "return_full_text", "details", "truncate",
                                   "best_of"])
small_values = st.one_of(st.integers(-2, 8), st.floats(-1, 3), st.booleans(), st.none(), st.text(max_size=5),
                         st.lists(st.text(max_size=4), max_size=6))
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"inputs": st.one_of(st.text(max_size=40), json_values)},
                          optional={"parameters": st.dictionaries(parameter_names, small_values, max_size=5),
                                    "stream": st.one_of(st.booleans(), json_values)}),
    st.fixed_dictionaries({"messages": st.one_of(
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]),
                                        "content": st.one_of(st.text(max_size=20), json_values)}), max_size=3),
        json_values)}, optional={"max_tokens": st.integers(-1, 6), "temperature": small_values,
                                 "stream": st.booleans()}),
)


# The same 120 bodies every run (derandomized): a landing is not blocked by a body no change of its made fail.
@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies)
def test_fuzzed_bodies_get_2xx_or_4xx_json_and_the_server_keeps_serving(server, body):
    response = server.invoke(json.dumps(body))
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        error = response.json()
        assert set(error) == {"error", "error_type"} and error["error"], error
    elif response.headers["Content-Type"].startswith("text/event-stream"):
        assert "data:" in response.text
    else:
        assert response.json()
    good = server.invoke({"inputs": "still there?", "parameters": {"max_new_tokens": 1}})
    assert good.status_code == 200


@pytest.mark.parametrize("quantize,message", [
    ("bitsandbytes", "QUANTIZE=bitsandbytes is TGI's bitsandbytes, which vLLM 0.32 does not have"),
    ("bitsandbytes-nf4", "or QUANTIZE=fp8 (8-bit weights in flight"),
    ("int3", "QUANTIZE='int3' is not valid: use one of awq, gptq, fp8"),
])
def test_quantize_values_that_cannot_run_here_are_refused_at_start(tiny_served_model, quantize, message):
    result = subprocess.run([str(BIN / "serve")], env={**os.environ, "SAGEMAKER_BASE_DIR": str(tiny_served_model),
                                                       "QUANTIZE": quantize},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr, result.stderr


# --- public clients, unchanged, against the real server -------------------------------------------------

def _stop_inside_a_token(server) -> tuple[str, list[dict]]:
    """A stop sequence that ends inside a generated token: the free text up to one character before the
    end of the first token that is two or more characters long."""
    free = server.invoke({"inputs": "Write about evals",
                          "parameters": {"max_new_tokens": 12, "details": True}}).json()[0]
    text = ""
    for token in free["details"]["tokens"]:
        if len(token["text"]) >= 2:
            return text + token["text"][:-1], free["details"]["tokens"]
        text += token["text"]
    raise AssertionError(f"no token of two characters in {free}")


def test_text_generation_client_generate_and_stream_with_a_stop_inside_a_token(server):
    from text_generation import Client

    client = Client(server.url + "/invocations", timeout=60)
    answer = client.generate("Write about evals", max_new_tokens=6, decoder_input_details=True, top_n_tokens=2)
    assert answer.details.generated_tokens == 6 and len(answer.details.tokens) == 6
    assert answer.details.prefill and answer.details.prefill[0].logprob is None
    assert all(len(top) >= 1 for top in answer.details.top_tokens)
    assert answer.generated_text == "".join(t.text for t in answer.details.tokens)

    stop, _ = _stop_inside_a_token(server)
    events = list(client.generate_stream("Write about evals", max_new_tokens=12, stop_sequences=[stop]))
    final = events[-1]
    assert final.details.finish_reason == "stop_sequence"
    assert final.generated_text.endswith(stop) and final.generated_text == stop
    assert "".join(e.token.text for e in events) == final.generated_text  # the stream adds up to the answer
    assert client.generate("Write about evals", max_new_tokens=12, stop_sequences=[stop]).generated_text == stop

    sampled = client.generate("Write about evals", max_new_tokens=4, do_sample=True, best_of=2, temperature=0.9)
    assert len(sampled.details.best_of_sequences) == 1


def test_huggingface_hub_inference_client_text_generation_and_chat(server):
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=server.url + "/invocations")
    text = client.text_generation("Write about evals", max_new_tokens=5)
    details = client.text_generation("Write about evals", max_new_tokens=5, details=True)
    assert text == details.generated_text and details.details.generated_tokens == 5
    streamed = list(client.text_generation("Write about evals", max_new_tokens=5, stream=True, details=True))
    assert "".join(e.token.text for e in streamed) == text == streamed[-1].generated_text

    chat = InferenceClient(base_url=server.url)
    messages = [{"role": "user", "content": "Write about evals"}]
    whole = chat.chat_completion(messages, max_tokens=5, temperature=0)
    parts = list(chat.chat_completion(messages, max_tokens=5, temperature=0, stream=True))
    assert whole.choices[0].message.content == "".join(p.choices[0].delta.content or "" for p in parts)
    assert whole.usage.completion_tokens == 5


def test_openai_sdk_chat_and_completions(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="not-needed")
    messages = [{"role": "user", "content": "Write about evals"}]
    whole = client.chat.completions.create(model="llm-twin", messages=messages, max_tokens=6, temperature=0, seed=1)
    stream = client.chat.completions.create(model="llm-twin", messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert whole.choices[0].message.content == "".join(pieces) and whole.choices[0].finish_reason in ("length", "stop")
    two = client.chat.completions.create(model="llm-twin", messages=messages, max_tokens=3, n=2, logprobs=True,
                                         top_logprobs=2)
    assert len(two.choices) == 2 and two.choices[0].logprobs.content[0].top_logprobs
    chunks = list(client.chat.completions.create(model="llm-twin", messages=messages, max_tokens=4, temperature=0,
                                                 stream=True, logprobs=True, top_logprobs=2))
    entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens == 4  # one per token, as the whole answer has
    assert all(len(entry.top_logprobs) == 2 for entry in entries)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Write about evals"}]}]  # text parts, as SDKs send
    as_parts = client.chat.completions.create(model="llm-twin", messages=parts, max_tokens=6, temperature=0, seed=1)
    assert as_parts.choices[0].message.content == whole.choices[0].message.content
    completion = client.completions.create(model="llm-twin", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 5
    assert [m.id for m in client.models.list()] == ["llm-twin"]
