"""Voice metrics: does the twin write like the person? Measured on the person's held-out writing.

For a few held-out prompts (the validation rows), the model answers through the chat template `serve`
applies, sampling as a user of the endpoint gets it (`serving_sampling`: the model's own generation_config.json,
else the LLM Twin client's settings) from a fixed seed, so the base and the twin draw the same random stream
and a rerun gives the same numbers; each answer is compared with what the person really wrote. Cheap, documented
measures, each a number a user can read:

    voice_length_ratio     mean words per answer / mean words per real answer (1.0: as long as the person)
    voice_distinct2        distinct word pairs / all word pairs in the answers (low: repetitive)
    voice_style_distance   total variation distance, in [0, 1], between the answers' and the person's
                           profile of function words and punctuation (how often "I", "just", "—", "!"...):
                           a stylometric fingerprint that does not depend on topic (0: the same habits)
    voice_overlap          mean unigram F1 between each answer and the real one (shared words)
    perplexity             exp(mean loss of the person's real answers to those prompts, through the chat
                           template): how surprised the model is by what the person wrote (lower: less)

The same measures for the base model are taken before training, so the report shows the move.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass

FUNCTION_WORDS = ("i", "me", "my", "we", "our", "you", "your", "it", "this", "that", "the", "a", "an", "and",
                  "but", "or", "so", "because", "if", "then", "of", "to", "in", "on", "for", "with", "at", "is",
                  "are", "was", "be", "not", "no", "just", "really", "very", "actually", "here", "there", "what")
PUNCTUATION = (".", ",", "!", "?", ";", ":", "-", "—", "(", "\"", "'", "…", "\n")
_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def profile(texts: list[str]) -> Counter:
    """How often each function word and punctuation mark occurs, as shares of all of them."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w in words(text) if w in FUNCTION_WORDS)
        counts.update(c for c in text if c in PUNCTUATION)
    return counts


def style_distance(answers: list[str], references: list[str]) -> float:
    ours, theirs = profile(answers), profile(references)
    total_ours, total_theirs = sum(ours.values()), sum(theirs.values())
    if not total_ours or not total_theirs:
        return 1.0 if total_ours != total_theirs else 0.0
    keys = set(ours) | set(theirs)
    return 0.5 * sum(abs(ours[k] / total_ours - theirs[k] / total_theirs) for k in keys)


def distinct_2(texts: list[str]) -> float:
    pairs = [pair for text in texts for pair in zip(words(text), words(text)[1:])]
    return len(set(pairs)) / len(pairs) if pairs else 0.0


def unigram_f1(answer: str, reference: str) -> float:
    ours, theirs = Counter(words(answer)), Counter(words(reference))
    common = sum((ours & theirs).values())
    if not common:
        return 0.0
    precision, recall = common / sum(ours.values()), common / sum(theirs.values())
    return 2 * precision * recall / (precision + recall)


def score(answers: list[str], references: list[str]) -> dict[str, float]:
    """The voice measures of `answers` against the person's `references` (same order)."""
    reference_words = sum(len(words(r)) for r in references) / len(references)
    answer_words = sum(len(words(a)) for a in answers) / len(answers)
    return {"voice_length_ratio": round(answer_words / reference_words, 4) if reference_words else 0.0,
            "voice_distinct2": round(distinct_2(answers), 4),
            "voice_style_distance": round(style_distance(answers, references), 4),
            "voice_overlap": round(sum(map(unigram_f1, answers, references)) / len(answers), 4)}


def reference_perplexity(model, tokenizer, prompts: list[list[dict]], references: list[str]) -> float:
    """exp of the mean loss per token of each real answer, after its prompt as `serve` renders it (the
    same rows before and after training, so the two numbers compare; every stage, not only SFT)."""
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for prompt, reference in zip(prompts, references):
            asked = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            whole = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reference}],
                                                  tokenize=False)
            prefix = tokenizer(asked, add_special_tokens=False)["input_ids"]
            ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
            if ids[:len(prefix)] != prefix:  # a template that renders the answer's turn differently: the answer alone
                ids = prefix + tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            labels = [-100] * len(prefix) + ids[len(prefix):]
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids], device=model.device),
                            labels=torch.tensor([labels], device=model.device))
            answered = len(ids) - len(prefix)  # the answer's tokens, each predicted once (the loss is their mean)
            total += out.loss.item() * answered
            count += answered
    finally:
        model.train(was_training)
    return round(math.exp(min(total / max(count, 1), 50.0)), 4)


def held_out_prompts(rows: list[dict], count: int) -> tuple[list[list[dict]], list[str]]:
    """The first `count` rows with a prompt and the person's answer (an SFT completion, a preference pair's
    chosen answer, a KTO row labelled good): (prompt messages, the real answer)."""
    prompts, answers = [], []
    for row in rows:
        answer = row.get("chosen") or (row.get("completion") if row.get("label", True) else None)
        if "prompt" in row and answer and len(prompts) < count:
            prompts.append(row["prompt"])
            answers.append(answer[-1]["content"])
    return prompts, answers


def prompts_digest(prompts: list[list[dict]], references: list[str]) -> str:
    """A short digest of the held-out rows the measures use: stages with the same digest measured the same
    prompts against the same answers, so their numbers share one table. It reveals none of the writing."""
    return hashlib.sha256(json.dumps([prompts, references], sort_keys=True).encode()).hexdigest()[:12]


SAMPLING_FIELDS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
# What the endpoint samples with when the model's generation_config.json says nothing: the LLM Twin client's
# top_p and repetition penalty (local_test/payloads/llm_twin_request.json), a temperature that samples, and no
# top-k cut, as vLLM (transformers' own default would cut at 50).
SERVING_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1}


@dataclass(frozen=True)
class Sampling:
    """How answers are generated. None: not passed (transformers takes the model's generation config)."""

    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None  # torch's generators start from it for each generation (forked: training's go on)
    from_generation_config: tuple[str, ...] = ()  # the fields the model's own generation config set

    def generate_kwargs(self) -> dict:
        kept = SAMPLING_FIELDS[1:] if self.do_sample else ("repetition_penalty",)  # greedy: no warper
        return {"do_sample": self.do_sample, **{k: getattr(self, k) for k in kept if getattr(self, k) is not None}}

    def report(self) -> dict:
        return {**asdict(self), "from_generation_config": list(self.from_generation_config)}


GREEDY = Sampling()  # preference=auto's rejected answers: what the model says most likely, as before


def serving_sampling(generation_config, seed: int) -> Sampling:
    """The sampling a user of the endpoint gets: each field the model's generation config sets (a
    transformers GenerationConfig: None is unset), else SERVING_DEFAULTS; temperature 0 is greedy, as in vLLM."""
    own = {k: getattr(generation_config, k, None) for k in SAMPLING_FIELDS}
    own = {k: v for k, v in own.items() if v is not None}
    values = {**SERVING_DEFAULTS, **own}
    if not values["temperature"]:
        values["do_sample"] = False
    return Sampling(**values, seed=seed, from_generation_config=tuple(own))


GPU_SHARE_FOR_GENERATION = 0.7  # move a model loaded on the CPU to this process's GPU when it fits in this share


def onto_gpu(model):
    """Generation on the GPU: a model loaded for training sits on the CPU until the Trainer places it (a
    QLoRA model is already on its GPU). It moves to this process's GPU now when it fits; the Trainer finds
    it there. One too large for a GPU (ZeRO-3's case) stays, and generates slowly on the CPU."""
    import torch

    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cpu":
        return model
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device = int(os.environ.get("LOCAL_RANK", "0"))
    if size < GPU_SHARE_FOR_GENERATION * torch.cuda.get_device_properties(device).total_memory:
        return model.to(f"cuda:{device}")
    return model


def bf16_compute(bf16: bool):
    """Generation computes as training does: in bf16 under autocast where training uses bf16. Full fine-tuning's
    weights are fp32 there (the master copy, plan.weights_dtype), and decoding from them in fp32 reads twice
    the bytes per token."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and torch.cuda.is_available())


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 8,
             sampling: Sampling = GREEDY) -> list[str]:
    """Answers through the chat template, as `serve` prompts the model: greedy unless `sampling` samples; the
    model's mode is kept. A seed starts torch's generators (the CPU's and the model's GPU's) afresh for this
    call only: the same prompts get the same answers, and training's own random stream goes on untouched."""
    import torch

    model = onto_gpu(model)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    device = model.device
    on_gpu = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=on_gpu, enabled=sampling.seed is not None):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            answers = _answers(model, tokenizer, prompts, max_new_tokens, batch_size, sampling)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def _answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
             sampling: Sampling) -> list[str]:
    import torch

    answers = []
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                 for p in prompts[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, **sampling.generate_kwargs(),
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        answers += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def measure(model, tokenizer, prompts: list[list[dict]], references: list[str], max_new_tokens: int,
            sampling: Sampling = GREEDY) -> tuple[dict, list[str]]:
    answers = generate(model, tokenizer, prompts, max_new_tokens, sampling=sampling)
    scores = score(answers, references)
    scores["perplexity"] = reference_perplexity(onto_gpu(model), tokenizer, prompts, references)
    return scores, answers
