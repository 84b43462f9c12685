"""train/voice.py: the voice metrics' and the model card's answers sample as the endpoint does, from a fixed
seed; preference=auto's rejected answers stay greedy."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from train.preferences import build_pairs
from train.voice import GREEDY, SERVING_DEFAULTS, Sampling, generate, serving_sampling

PROMPTS = [[{"role": "user", "content": f"Write about lesson {i}."}] for i in range(3)]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)


def generate_calls(model, monkeypatch) -> list[dict]:
    """The keyword arguments of every model.generate call, the call itself going on as before."""
    calls, real = [], model.generate

    def recording(**kwargs):
        calls.append({k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")})
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", recording)
    return calls


def test_without_sampling_fields_in_the_generation_config_the_llm_twin_client_s_settings_apply():
    for config in (GenerationConfig(), GenerationConfig(bos_token_id=1, eos_token_id=2), None):
        sampling = serving_sampling(config, 42)
        assert sampling == Sampling(**SERVING_DEFAULTS, seed=42)
    assert SERVING_DEFAULTS == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0,
                                "repetition_penalty": 1.1}
    assert serving_sampling(None, 7).report() == {**SERVING_DEFAULTS, "seed": 7, "from_generation_config": []}


def test_the_fields_the_model_s_generation_config_sets_win_one_by_one():
    qwen = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert serving_sampling(qwen, 42) == Sampling(True, 0.6, 0.8, 20, 1.05, seed=42, from_generation_config=(
        "do_sample", "temperature", "top_p", "top_k", "repetition_penalty"))
    llama = serving_sampling(GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9), 42)
    assert (llama.temperature, llama.top_p, llama.top_k, llama.repetition_penalty) == (0.6, 0.9, 0, 1.1)
    assert llama.from_generation_config == ("do_sample", "temperature", "top_p")
    assert not serving_sampling(GenerationConfig(do_sample=False), 42).do_sample  # the model asks for greedy
    assert not serving_sampling(GenerationConfig(temperature=0.0), 42).do_sample  # temperature 0: greedy, as vLLM


def test_greedy_passes_no_sampling_and_a_greedy_model_keeps_its_repetition_penalty():
    assert GREEDY.generate_kwargs() == {"do_sample": False} and GREEDY.seed is None
    assert serving_sampling(GenerationConfig(do_sample=False, temperature=0.6), 1).generate_kwargs() == {
        "do_sample": False, "repetition_penalty": 1.1}
    assert serving_sampling(None, 1).generate_kwargs() == {"do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                                           "top_k": 0, "repetition_penalty": 1.1}


def test_sampled_answers_repeat_from_the_seed_and_leave_training_s_random_stream_alone(tiny, monkeypatch):
    model, tokenizer = tiny
    calls = generate_calls(model, monkeypatch)
    sampling = serving_sampling(model.generation_config, 42)
    torch.manual_seed(0)
    first = generate(model, tokenizer, PROMPTS, 8, sampling=sampling)
    after_generating = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after_generating, torch.rand(4))  # generation drew from a forked stream
    assert generate(model, tokenizer, PROMPTS, 8, sampling=sampling) == first  # a rerun: the same answers
    assert calls[0]["do_sample"] and calls[0]["temperature"] == 0.7 and calls[0]["repetition_penalty"] == 1.1
    assert len(first) == len(PROMPTS) and not model.training


def test_preference_auto_s_rejected_answers_are_still_greedy(tiny, monkeypatch):
    model, tokenizer = tiny
    calls = generate_calls(model, monkeypatch)
    rows = [{"prompt": p, "completion": [{"role": "assistant", "content": "Measure first."}]} for p in PROMPTS]
    pairs = build_pairs(model, tokenizer, rows, 8)
    assert [call["do_sample"] for call in calls] == [False] and "temperature" not in calls[0]
    assert [pair["rejected"][0]["content"] for pair in pairs if pair] == [
        answer for answer in generate(model, tokenizer, PROMPTS, 8) if answer != "Measure first."]
