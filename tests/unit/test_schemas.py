import pytest

from serve.errors import ValidationError
from serve.schemas import parse_generate, parse_request

LLM_TWIN_BODY = {"inputs": "User query: write about RAG", "parameters": {
    "max_new_tokens": 150, "top_p": 0.9, "temperature": 0.01, "return_full_text": False, "repetition_penalty": 1.1}}


def test_llm_twin_request_parses_and_samples_like_tgi():
    request = parse_generate(LLM_TWIN_BODY)
    p = request.params
    assert (p.max_new_tokens, p.top_p, p.temperature, p.repetition_penalty) == (150, 0.9, 0.01, 1.1)
    assert p.sampling and not p.return_full_text


def test_greedy_by_default_and_top_p_one_is_accepted():
    assert not parse_generate({"inputs": "x"}).params.sampling
    assert not parse_generate({"inputs": "x", "parameters": {"top_p": 1.0}}).params.sampling
    assert parse_generate({"inputs": "x", "parameters": {"top_k": 5}}).params.sampling


def test_stop_sequences_is_an_alias_of_stop():
    assert parse_generate({"inputs": "x", "parameters": {"stop_sequences": ["\n\n"]}}).params.stop == ("\n\n",)
    assert parse_generate({"inputs": "x", "parameters": {"stop": "END"}}).params.stop == ("END",)


@pytest.mark.parametrize("body,message", [
    ([], "must be a JSON object, got an array"),
    ({"parameters": {}}, "missing field 'inputs'"),
    ({"inputs": ["a"]}, "'inputs' must be a string, got an array"),
    ({"inputs": "  "}, "'inputs' cannot be empty"),
    ({"input": "x"}, "unknown field 'input': did you mean 'inputs'"),
    ({"inputs": "x", "parameters": []}, "'parameters' must be an object"),
    ({"inputs": "x", "parameters": {"max_tokens": 5}}, "unknown parameter 'max_tokens': did you mean 'max_new_tokens'"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, "'max_new_tokens' must be >= 1"),
    ({"inputs": "x", "parameters": {"max_new_tokens": "5"}}, "'max_new_tokens' must be an integer"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 2.5}}, "'max_new_tokens' must be an integer"),
    ({"inputs": "x", "parameters": {"temperature": 0}}, "'temperature' must be > 0.0"),
    ({"inputs": "x", "parameters": {"top_p": 1.5}}, "'top_p' must be <= 1.0"),
    ({"inputs": "x", "parameters": {"do_sample": "yes"}}, "'do_sample' must be true or false"),
    ({"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "at most 4 sequences"),
    ({"inputs": "x", "parameters": {"stop": [""]}}, "list of non-empty strings"),
    ({"inputs": "x", "parameters": {"seed": -1}}, "'seed' must be >= 0"),
    ({"inputs": "x", "stream": "yes"}, "'stream' must be true or false"),
    ({"inputs": "x", "parameters": {"truncate": 0}}, "'truncate' must be >= 1"),
    ({"messages": []}, "'messages' must be a non-empty array"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages\\[0\\].role must be system, user or assistant"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "'n' must be 1"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokenz": 2}, "unknown field 'max_tokenz': did you mean 'max_tokens'"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "'temperature' must be <= 2.0"),
])
def test_invalid_requests_are_validation_errors_naming_the_field(body, message):
    with pytest.raises(ValidationError, match=message):
        parse_request(body)


def test_chat_requests_follow_openai_defaults():
    request = parse_request({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 7, "stream": True})
    assert request.messages == [{"role": "user", "content": "Hi"}] and request.stream
    assert request.params.max_new_tokens == 7 and request.params.sampling  # temperature defaults to 1
    greedy = parse_request({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0})
    assert not greedy.params.sampling
