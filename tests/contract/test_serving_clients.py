"""Clients and hostile input against the real server: the SageMaker SDK's local runtime client, a
property-based fuzz of request bodies, and 4-bit loading."""

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


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
                                   "stop", "stop_sequences", "seed", "return_full_text", "details", "truncate", "best_of"])
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
        json_values)}, optional={"max_tokens": st.integers(-1, 6), "temperature": small_values, "stream": st.booleans()}),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
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


def test_quantize_bitsandbytes_loads_4bit_and_answers(tiny_served_model, serve_tree):
    server = serve_tree(tiny_served_model, QUANTIZE="bitsandbytes")
    response = server.invoke({"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True}})
    assert response.status_code == 200, response.text
    assert response.json()[0]["details"]["generated_tokens"] >= 1
    assert "weights loaded in 4-bit nf4" in server.stop()
