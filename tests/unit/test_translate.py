"""serve/translate.py with a tokenizer alone: a parsed request to prompt ids and SamplingParams, and vLLM's
outputs to the answer's texts and TGI's finish reasons. No engine, no threads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from serve import translate
from serve.errors import GenerationError, ValidationError
from serve.schemas import parse_chat, parse_completion, parse_generate, parse_request

LIMITS = translate.Limits(max_input_tokens=40, max_total_tokens=64, default_max_new_tokens=16)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def plan(tokenizer, body, template=True, parse=parse_generate):
    return translate.plan(parse(body), tokenizer, LIMITS, template)


def test_inputs_are_wrapped_in_the_chat_template_unless_serving_json_or_the_route_says_not(tokenizer):
    templated = plan(tokenizer, {"inputs": "Hi"})
    assert tokenizer.decode(templated.prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(plan(tokenizer, {"inputs": "Hi"}, template=False).prompt_ids) == "Hi"
    completion = plan(tokenizer, {"prompt": "Hi", "max_tokens": 2}, parse=parse_completion)
    assert tokenizer.decode(completion.prompt_ids) == "Hi"
    chat = plan(tokenizer, {"messages": [{"role": "system", "content": "Be Dana."}, {"role": "user", "content": "Hi"}]},
                parse=parse_chat)
    assert tokenizer.decode(chat.prompt_ids).startswith("<|im_start|>system\nBe Dana.<|im_end|>\n<|im_start|>user\nHi")


def test_truncate_keeps_the_last_tokens_of_the_inputs_inside_the_template(tokenizer):
    long = "one two three four five six seven eight"
    cut = plan(tokenizer, {"inputs": long, "parameters": {"truncate": 2}})
    text = tokenizer.decode(cut.prompt_ids)
    kept = text.removeprefix("<|im_start|>user\n").split("<|im_end|>")[0]
    assert text.startswith("<|im_start|>user\n") and long.endswith(kept) and len(kept) < len(long)
    # truncate at the limit: the inputs are cut further, so that the template's own tokens fit too
    full = plan(tokenizer, {"inputs": "word " * 200, "parameters": {"truncate": 40}})
    assert 30 < len(full.prompt_ids) <= 40
    # a truncate beyond the input tokens would let any prompt size reach the tokenizer: refused, as TGI does
    with pytest.raises(ValidationError, match="'truncate' must be <= 40 \\(this model's input tokens\\), got 41"):
        plan(tokenizer, {"inputs": long, "parameters": {"truncate": 41}})


def test_the_limits_name_what_is_too_long(tokenizer):
    with pytest.raises(ValidationError, match="inputs must have less than 40 tokens. Given: "):
        plan(tokenizer, {"inputs": "word " * 60})
    with pytest.raises(ValidationError, match="inputs tokens \\+ max_new_tokens must be <= 64. Given: .* and 60"):
        plan(tokenizer, {"inputs": "Hi", "parameters": {"max_new_tokens": 60}})
    unset = plan(tokenizer, {"inputs": "Hi"})  # serving.json's default, within what is left of the model length
    assert unset.sampling.max_tokens == 16
    short = translate.Limits(max_input_tokens=40, max_total_tokens=45, default_max_new_tokens=16)
    near_the_end = translate.plan(parse_generate({"inputs": "word " * 18}), tokenizer, short, False)
    assert 0 < near_the_end.sampling.max_tokens == 45 - len(near_the_end.prompt_ids) < 16


def test_max_new_tokens_keeps_its_name_until_sampling_params_calls_it_max_tokens(tokenizer):
    assert plan(tokenizer, {"inputs": "Hi", "parameters": {"max_new_tokens": 7}}).sampling.max_tokens == 7
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    assert plan(tokenizer, {**chat, "max_tokens": 5}, parse=parse_chat).sampling.max_tokens == 5
    assert plan(tokenizer, {**chat, "max_completion_tokens": 6}, parse=parse_chat).sampling.max_tokens == 6


def test_tgi_parameters_become_sampling_params(tokenizer):
    greedy = plan(tokenizer, {"inputs": "Hi", "parameters": {"stop": ["."], "repetition_penalty": 1.2}})
    assert (greedy.sampling.temperature, greedy.sampling.top_k, greedy.sampling.top_p) == (0.0, 0, 1.0)
    assert greedy.sampling.stop == ["."] and greedy.sampling.include_stop_str_in_output
    assert greedy.sampling.repetition_penalty == 1.2 and greedy.seed is None and greedy.sampling.logprobs is None
    sampled = plan(tokenizer, {"inputs": "Hi", "parameters": {"temperature": 0.7, "top_k": 5, "seed": 3}})
    assert (sampled.sampling.temperature, sampled.sampling.top_k, sampled.seed) == (0.7, 5, 3)
    drawn = plan(tokenizer, {"inputs": "Hi", "parameters": {"do_sample": True}})
    assert isinstance(drawn.seed, int) and drawn.sampling.seed == drawn.seed  # the answer says what reproduces it
    best_of = plan(tokenizer, {"inputs": "Hi", "parameters": {"do_sample": True, "best_of": 3}})
    assert best_of.sampling.n == 3 and best_of.pick_best and best_of.seed is None and best_of.sampling.logprobs == 0
    streamed = plan(tokenizer, {"inputs": "Hi", "stream": True, "parameters": {"top_n_tokens": 2}})
    assert streamed.stream and streamed.sampling.logprobs == 2 and streamed.sampling.output_kind.name == "DELTA"
    grammar = plan(tokenizer, {"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "[0-9]+"}}})
    assert grammar.sampling.structured_outputs.regex == "[0-9]+"


def test_what_vllm_refuses_is_a_validation_error(tokenizer):
    with pytest.raises(ValidationError, match="greedy"):
        plan(tokenizer, {"messages": [{"role": "user", "content": "Hi"}], "n": 2, "temperature": 0}, parse=parse_chat)


def logprob(value, rank=1, text=""):
    return SimpleNamespace(logprob=value, rank=rank, decoded_token=text)


def output(ids, text, finish=None, stop_reason=None, index=0, cumulative=None, logprobs=None):
    return SimpleNamespace(index=index, token_ids=ids, text=text, finish_reason=finish, stop_reason=stop_reason,
                           cumulative_logprob=cumulative, logprobs=logprobs)


def test_a_delta_of_several_tokens_puts_its_text_on_its_last_token_that_is_not_special(tokenizer):
    streamed = plan(tokenizer, {"inputs": "Hi", "stream": True})
    sequence = translate.SequenceOutput()
    first = translate.add_output(sequence, output([5, 6], "ab", logprobs=[{5: logprob(-0.5)}, {6: logprob(-0.7)}]),
                                 streamed, special_ids={0}, decode=tokenizer.decode)
    assert [e["token"]["text"] for e in first] == ["", "ab"] and first[0]["token"]["logprob"] == -0.5
    last = translate.add_output(sequence, output([7, 0], "c", finish="stop"), streamed, {0}, tokenizer.decode)
    assert [e["token"]["text"] for e in last] == ["c", ""] and last[1]["token"]["special"]
    assert (sequence.text, sequence.finish_reason) == ("abc", "eos_token")
    result = translate.result(streamed, {0: sequence}, prefill=[])
    assert result.text == "abc" and result.generated_tokens == 4 and result.input_tokens == len(streamed.prompt_ids)


def test_a_whole_answer_gets_each_tokens_text_and_best_of_answers_the_most_likely(tokenizer):
    best_of = plan(tokenizer, {"inputs": "Hi", "parameters": {"do_sample": True, "best_of": 2, "details": True}})
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    sequences = {i: translate.SequenceOutput() for i in (0, 1)}
    translate.add_output(sequences[0], output(ids, "hello world", "length", cumulative=-9.0), best_of, set(),
                         tokenizer.decode)
    translate.add_output(sequences[1], output(ids[:1], "hello", "stop", "lo", 1, cumulative=-1.0), best_of, set(),
                         tokenizer.decode)
    assert "".join(t["text"] for t in sequences[0].tokens) == "hello world"
    result = translate.result(best_of, sequences, prefill=[])
    assert (result.text, result.finish_reason) == ("hello", "stop_sequence")
    assert [s.text for s in result.others] == ["hello world"]


def test_finish_reasons_in_tgis_words_and_an_unfinished_answer_is_an_error(tokenizer):
    assert translate.finish_reason("length", None) == "length"
    assert translate.finish_reason("stop", "\n\n") == "stop_sequence"
    assert translate.finish_reason("stop", 2) == translate.finish_reason("stop", None) == "eos_token"
    with pytest.raises(GenerationError, match="the engine ended the request: abort"):
        translate.finish_reason("abort", None)
    with pytest.raises(GenerationError, match="the engine aborted the request"):
        translate.result(plan(tokenizer, {"inputs": "Hi"}), {0: translate.SequenceOutput()}, prefill=[])


def test_a_prompt_that_cannot_fit_is_refused_before_the_template_and_the_tokenizer_see_it(tokenizer, monkeypatch):
    limits = translate.Limits(40, 64, 16, max_token_chars=translate.longest_token(tokenizer))
    assert 0 < limits.max_token_chars < 100 and limits.max_prompt_chars == 40 * limits.max_token_chars

    def refuse(*args, **kwargs):
        raise AssertionError("the template or the tokenizer ran on a prompt that cannot fit")

    chat = {"messages": [{"role": "user", "content": "hi"}] * 41}
    long = "w" * (limits.max_prompt_chars + 1)
    with monkeypatch.context() as patched:
        patched.setattr(tokenizer, "apply_chat_template", refuse)
        patched.setattr(type(tokenizer), "__call__", refuse)
        with pytest.raises(ValidationError, match="'messages' has 41 messages: at most 40 fit"):
            translate.plan(parse_chat(chat), tokenizer, limits, True)
        long_chat = parse_chat({"messages": [{"role": "user", "content": long}]})
        for request in (parse_generate({"inputs": long}), long_chat):
            with pytest.raises(ValidationError, match=f"the prompt has {len(long)} characters"):
                translate.plan(request, tokenizer, limits, True)
    truncated = translate.plan(parse_generate({"inputs": "one two " * 10**5, "parameters": {"truncate": 4}}),
                               tokenizer, limits, False)  # cut to its last characters, then to 4 tokens
    assert tokenizer.decode(truncated.prompt_ids).strip().endswith("one two")


def test_a_streamed_chat_carries_every_tokens_logprob_and_top_logprobs_as_the_whole_answer_does(tokenizer):
    from serve import openai

    body = {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 2, "stream": True}
    streamed = plan(tokenizer, body, parse=parse_chat)
    sequence, events = translate.SequenceOutput(), []
    tops = [{5: logprob(-0.5, 1, "a"), 8: logprob(-1.5, 2, "b")}, {6: logprob(-0.7, 1, "c"), 9: logprob(-2.0, 2)}]
    events += translate.add_output(sequence, output([5, 6], "ab", logprobs=tops), streamed, {0}, tokenizer.decode)
    events += translate.add_output(sequence, output([7], "c", finish="length", logprobs=[{7: logprob(-0.1)}]),
                                   streamed, {0}, tokenizer.decode)
    result = translate.result(streamed, {0: sequence}, prefill=[])
    chunks = list(openai.stream(parse_chat(body), [*(("token", e) for e in events), ("done", result)]))
    entries = [entry for chunk in chunks if chunk["choices"][0]["logprobs"]
               for entry in chunk["choices"][0]["logprobs"]["content"]]
    assert [e["logprob"] for e in entries] == [-0.5, -0.7, -0.1] == [t["logprob"] for t in result.best.tokens]
    assert [[t["token"] for t in e["top_logprobs"]] for e in entries[:2]] == [["a", "b"], ["c", ""]]
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["", "ab", "c", None]  # role, texts, last


@pytest.mark.parametrize("body, name", [
    ('{"inputs": "x", "parameters": {"stop": ["\\udc00"]}}', "stop"),
    ('{"inputs": "x", "parameters": {"grammar": {"type": "json", "value": "{\\"pattern\\": \\"\\\\udc00\\"}"}}}',
     "grammar"),  # a schema given as a string: its own escapes are read after the body's
    ('{"messages": [{"role": "user", "content": "x"}], "cache_salt": "\\ud800"}', "cache_salt"),
    ('{"inputs": "a\\ud800b"}', "inputs"),
])
def test_half_of_a_surrogate_pair_is_refused_before_vllm_sees_it(tokenizer, body, name):
    with pytest.raises(ValidationError, match=f"'{name}' holds half of a UTF-16 surrogate pair"):
        translate.plan(parse_request(json.loads(body)), tokenizer, LIMITS, True)
    for encoding in ("utf-16", "utf-32"):  # a body in UTF-16 or 32, which json.loads reads as well
        with pytest.raises(ValidationError, match=f"'{name}'"):
            translate.plan(parse_request(json.loads(body.encode(encoding))), tokenizer, LIMITS, True)


def test_a_surrogate_pair_is_one_character():
    smile = "\\ud83d\\ude00"  # as Python's json.dumps writes an emoji
    request = parse_request(json.loads(f'{{"inputs": "smile {smile}", "parameters": {{"stop": ["{smile}"]}}}}'))
    translate.check_unicode(request)
    assert request.params.stop == ("\U0001F600",)
