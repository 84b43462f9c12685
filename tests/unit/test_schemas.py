import pytest

from serve.errors import Forbidden, ValidationError
from serve.schemas import parse_completion, parse_generate, parse_request

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
    ({"messages": [{"role": "user", "content": "x"}], "n": 9}, "'n' must be <= 4"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2, "stream": True},
     "'n' > 1 is not supported when 'stream'"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "'tools' is not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}},
     "'response_format' must be"),
    ({"inputs": "x", "parameters": {"typical_p": 0.5}}, "'typical_p' is not supported"),
    ({"inputs": "x", "parameters": {"watermark": True}}, "'watermark' is not supported"),
    ({"inputs": "x", "parameters": {"best_of": 2}}, "'best_of' > 1 needs sampling"),
    ({"inputs": "x", "parameters": {"best_of": 2, "do_sample": True, "seed": 1}}, "'seed' must not be set"),
    ({"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}, "stream": True}, "not supported when 'stream'"),
    ({"inputs": "x", "parameters": {"top_n_tokens": 6}}, "'top_n_tokens' must be <= 5"),
    ({"inputs": "x", "parameters": {"grammar": {"type": "xml", "value": "x"}}}, "'grammar' must be"),
    ({"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": ""}}}, "non-empty pattern"),
    ({"inputs": "x", "parameters": {"adapter_id": 3}}, "'adapter_id' must be a non-empty string"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokenz": 2},
     "unknown field 'max_tokenz': did you mean 'max_tokens'"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "'temperature' must be <= 2.0"),
    ({"inputs": "x", "messages": [{"role": "user", "content": "x"}]}, "'inputs' or OpenAI chat's 'messages', not both"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "only text parts .* got 'image_url'"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": 5}, "'stream_options' must be"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
     "only allowed when 'stream' is true"),
    ({"messages": [{"role": "user", "content": "x"}], "user": 5}, "'user' must be a string"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object", "schema": {}}},
     "'response_format' must be"),  # OpenAI's json_object has no schema; TGI's says `value`
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "regex"}}, "non-empty pattern"),
    ({"messages": [{"role": "user", "content": "x"}], "cache_salt": 7}, "'cache_salt' must be a string, got a number"),
    ({"messages": [{"role": "user", "content": "x"}], "cache_salt": ""}, "'cache_salt' must be 1 to 128 characters"),
    ({"messages": [{"role": "user", "content": "x"}], "cache_salt": "s" * 129}, "got 129 characters"),
    ({"messages": [{"role": "user", "content": "x"}], "cache_salt": "a/b"}, "none of them '@', '/'"),
    ({"inputs": "x", "cache_salt": "s"}, "unknown field 'cache_salt'"),  # TGI's payload has none: OpenAI's only
])
def test_invalid_requests_are_validation_errors_naming_the_field(body, message):
    with pytest.raises(ValidationError, match=message):
        parse_request(body)


def test_chat_requests_follow_openai_defaults():
    request = parse_request({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 7, "stream": True})
    assert request.messages == [{"role": "user", "content": "Hi"}] and request.stream
    assert request.params.max_new_tokens == 7 and request.params.sampling  # temperature defaults to 1
    greedy = parse_request({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "top_p": 0.9})
    assert not greedy.params.sampling  # temperature 0 is greedy, whatever top_p says


# What TGI's own Python client (`text-generation` 0.7) sends for a plain generate call: every parameter.
TGI_CLIENT_PARAMETERS = {"best_of": None, "decoder_input_details": False, "details": True, "do_sample": False,
                         "frequency_penalty": None, "grammar": None, "max_new_tokens": 20, "repetition_penalty": None,
                         "return_full_text": False, "seed": None, "stop": [], "temperature": None, "top_k": None,
                         "top_n_tokens": None, "top_p": None, "truncate": None, "typical_p": None, "watermark": False}


def test_neutral_values_of_every_tgi_parameter_are_accepted():
    request = parse_generate({"inputs": "x", "parameters": TGI_CLIENT_PARAMETERS, "stream": False})
    assert request.params.max_new_tokens == 20 and not request.params.sampling and request.params.best_of == 1
    assert parse_generate({"inputs": "x", "parameters": {"typical_p": 1.0, "watermark": False}}).params.best_of == 1


def test_chat_takes_text_parts_tgis_response_formats_and_generate_says_where_a_chat_goes():
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    assert parse_request({"messages": [{"role": "user", "content": parts}]}).messages == [
        {"role": "user", "content": "Hello\nthere"}]
    schema = {"type": "object", "properties": {"unit": {"type": "string"}}, "required": ["unit"]}
    chat = {"messages": [{"role": "user", "content": "x"}]}
    for response_format, grammar in (({"type": "json_object", "value": schema}, ("json", schema)),  # TGI's docs
                                     ({"type": "json", "value": schema}, ("json", schema)),
                                     ({"type": "regex", "value": "[0-9]+"}, ("regex", "[0-9]+")),
                                     ({"type": "json_object"}, ("json", None)),  # OpenAI's: any JSON object
                                     ({"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
                                      ("json", schema))):
        parsed = parse_request({**chat, "response_format": response_format}).params.grammar
        assert (parsed.kind, parsed.value) == grammar, response_format
    with pytest.raises(ValidationError, match="TGI's generate takes 'inputs', not 'messages'"):
        parse_generate({"inputs": "x", "messages": []})
    assert parse_completion({"prompt": "Once", "logprobs": 0}).completion  # OpenAI's integer, 0: none


def test_grammar_best_of_and_top_n_tokens_parse():
    p = parse_generate({"inputs": "x", "parameters": {"grammar": {"type": "json", "value": {"type": "object"}},
                                                      "best_of": 2, "do_sample": True, "top_n_tokens": 3}}).params
    assert (p.grammar.kind, p.grammar.value, p.best_of, p.top_n_tokens) == ("json", {"type": "object"}, 2, 3)
    assert (parse_generate({"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "[0-9]+"}}})
            .params.grammar.value == "[0-9]+")


def test_openai_chat_fields_map_onto_the_same_parameters():
    request = parse_request({"messages": [{"role": "user", "content": "Hi"}], "n": 2, "temperature": 0.5,
                             "logprobs": True, "top_logprobs": 2, "response_format": {"type": "json_object"},
                             "tools": None, "frequency_penalty": 0.5, "presence_penalty": 0.1, "model": "dana"})
    p = request.params
    assert (p.best_of, p.logprobs, p.top_n_tokens, p.grammar.kind, p.grammar.value) == (2, True, 2, "json", None)
    assert (p.frequency_penalty, p.presence_penalty, request.model) == (0.5, 0.1, "dana")


def test_completions_use_the_raw_prompt_and_the_adapter_header_picks_an_adapter():
    request = parse_completion({"model": "x", "prompt": "Once upon", "max_tokens": 5, "temperature": 0})
    assert request.completion and request.inputs == "Once upon" and request.params.max_new_tokens == 5
    assert parse_request({"inputs": "x"}, adapter_header="dana").params.adapter_id == "dana"
    with pytest.raises(Forbidden, match="set by SageMaker's X-Amzn-SageMaker-Adapter-Identifier header"):
        parse_request({"inputs": "x", "parameters": {"adapter_id": "sam"}}, adapter_header="dana")
    for served in ("llm-twin", "tgi", "dummy"):  # the served model's names (huggingface_hub sends "dummy")
        chat = {"messages": [{"role": "user", "content": "x"}], "model": served}
        assert parse_request(chat, adapter_header="dana").params.adapter_id == "dana"


def test_openai_requests_carry_vllms_cache_salt():
    chat = parse_request({"messages": [{"role": "user", "content": "x"}], "cache_salt": "mine"})
    assert chat.cache_salt == "mine"
    assert parse_completion({"prompt": "x", "cache_salt": "mine"}).cache_salt == "mine"
    assert parse_request({"messages": [{"role": "user", "content": "x"}]}).cache_salt is None
