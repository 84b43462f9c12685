"""A parsed request in, what vLLM needs out; vLLM's outputs in, the answer's texts and finish reasons out.

Pure: no threads, no engine, no HTTP. A tokenizer (and vLLM's SamplingParams class) is all it needs, so
every rule of TGI's semantics here is unit-tested with a tokenizer alone:

- the prompt: TGI's `inputs` (wrapped in the model's chat template when serving.json says so, after
  `truncate`), or OpenAI's `messages` through the chat template, or a completion's raw prompt;
- the limits: the prompt within `max_input_tokens`, prompt + `max_new_tokens` within `max_total_tokens`;
- the sampling: TGI's parameters as one SamplingParams (stop sequences stay in the text, as in TGI);
- the answer: vLLM's text deltas gathered per sequence, each token's text, TGI's finish reason.

`max_new_tokens` keeps its name from the edge to here; `SamplingParams` calls it `max_tokens`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace

from serve.errors import GenerationError, ServeError, ValidationError
from serve.schemas import GenerateRequest, GenerateResult, Sequence


@dataclass(frozen=True)
class Limits:
    """The token limits every request is checked against (and /info reports)."""

    max_input_tokens: int
    max_total_tokens: int
    default_max_new_tokens: int  # serving.json's, when a request names none
    max_token_chars: int = 0  # the tokenizer's longest token, in characters (0: prompts are not pre-checked)

    @property
    def max_prompt_chars(self) -> int:
        """No prompt longer than this fits in max_input_tokens: each token covers at most max_token_chars."""
        return self.max_input_tokens * self.max_token_chars


def longest_token(tokenizer) -> int:
    """The longest token of the vocabulary, in characters: an upper bound on the characters one token covers
    (a byte-level token's text has one character per byte; a sentencepiece piece spells what it covers)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=0)


@dataclass(frozen=True)
class Plan:
    """One request made ready for vLLM."""

    prompt_ids: list[int]
    sampling: object  # vllm.SamplingParams
    seed: int | None  # reported in TGI's details: the request's, or the one drawn for it
    pick_best: bool  # TGI best_of: answer the most likely of n; OpenAI n: answer all
    wants_tokens: bool  # per-token texts are computed only when the answer shows them
    stream: bool
    cache_salt: str | None = None  # GenerateRequest.cache_salt


@dataclass
class SequenceOutput:
    """One sequence's output, gathered from vLLM's deltas (or its one final output)."""

    text: str = ""
    tokens: list = field(default_factory=list)
    top_tokens: list = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None


def plan(request: GenerateRequest, tokenizer, limits: Limits, template_for_inputs: bool) -> Plan:
    """Tokenize and check one request against the limits; ValidationError names what is wrong."""
    from vllm.exceptions import VLLMClientError

    p = request.params
    check_prompt_size(request, limits)
    check_unicode(request)
    try:
        ids = prompt_ids(request, tokenizer, template_for_inputs, limits.max_token_chars)
        for _ in range(3):  # `truncate` keeps the inputs' last tokens; the template's own then must fit too
            over = len(ids) - limits.max_input_tokens
            if p.truncate is None or over <= 0 or p.truncate <= over:
                break
            request = replace(request, params=replace(p, truncate=p.truncate - over))
            p = request.params
            ids = prompt_ids(request, tokenizer, template_for_inputs, limits.max_token_chars)
    except ServeError:
        raise
    except Exception as e:  # e.g. jinja's TemplateError: "roles must alternate"
        raise ValidationError(f"the prompt could not be built: {type(e).__name__}: {e}") from None
    max_new_tokens = p.max_new_tokens or min(limits.default_max_new_tokens, limits.max_total_tokens - len(ids))
    if len(ids) > limits.max_input_tokens:
        raise ValidationError(f"inputs must have less than {limits.max_input_tokens} tokens. Given: {len(ids)}")
    if len(ids) + max_new_tokens > limits.max_total_tokens:
        raise ValidationError(
            f"inputs tokens + max_new_tokens must be <= {limits.max_total_tokens}. "
            f"Given: {len(ids)} inputs tokens and {max_new_tokens} max_new_tokens")
    seed = p.seed
    if p.sampling and p.best_of == 1 and seed is None:  # drawn here, so the answer can say what reproduces it
        seed = random.randrange(2**63)
    try:
        sampling = sampling_params(request, max_new_tokens, seed)
    except VLLMClientError as e:  # what vLLM itself refuses, e.g. n > 1 with greedy decoding
        raise ValidationError(str(e)) from None
    return Plan(ids, sampling, seed if p.best_of == 1 else None,
                pick_best=p.best_of > 1 and request.messages is None and not request.completion,
                wants_tokens=p.details or p.logprobs, stream=request.stream, cache_salt=request.cache_salt)


def check_unicode(request: GenerateRequest) -> None:
    """The texts that reach vLLM as they are must be Unicode. JSON can spell half of a UTF-16 surrogate pair
    (`\\udc00`, in the body or in a grammar given as a string, or in a UTF-16 body), which no character is:
    vLLM's msgpack fails on it after the request is registered, and the request stays there; the tokenizer
    fails on it in the prompt with a TypeError that says nothing."""
    p = request.params
    grammar = p.grammar.value if p.grammar else None
    texts = (("inputs", request.inputs), ("messages", request.messages), ("stop", p.stop), ("grammar", grammar),
             ("cache_salt", request.cache_salt))
    for name, value in texts:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(f"'{name}' holds half of a UTF-16 surrogate pair (\\ud800-\\udfff) without "
                                  "its other half, which is no character") from None


def check_prompt_size(request: GenerateRequest, limits: Limits) -> None:
    """Refuse, before the chat template and the tokenizer run on it, a prompt that cannot fit: more messages
    than input tokens (every message costs at least one), or more characters than max_input_tokens tokens
    can cover. A `truncate` request is cut to its last characters instead (prompt_ids)."""
    messages = request.conversation
    if messages is not None and len(messages) > limits.max_input_tokens:
        raise ValidationError(f"'messages' has {len(messages)} messages: at most {limits.max_input_tokens} "
                              f"fit in this model's {limits.max_input_tokens} input tokens")
    truncate = request.params.truncate
    if truncate is not None and truncate > limits.max_input_tokens:  # as TGI: else it bounds nothing it is read for
        raise ValidationError(f"parameter 'truncate' must be <= {limits.max_input_tokens} (this model's input "
                              f"tokens), got {truncate}")
    if not limits.max_token_chars or (truncate is not None and messages is None):
        return
    chars = sum(len(m["content"]) for m in messages) if messages is not None else len(request.inputs)
    if chars > limits.max_prompt_chars:
        raise ValidationError(f"the prompt has {chars} characters, more than {limits.max_input_tokens} input tokens "
                              f"can hold (at most {limits.max_prompt_chars} characters with this tokenizer)")


def prompt_ids(request: GenerateRequest, tokenizer, template_for_inputs: bool, max_token_chars: int = 0) -> list[int]:
    if request.conversation is not None:
        text = tokenizer.apply_chat_template(request.conversation, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    inputs = request.inputs
    truncate = request.params.truncate
    if truncate is not None:  # TGI: keep the last `truncate` tokens of the inputs, before any template
        if max_token_chars:  # the characters before these cannot reach the last `truncate` tokens
            inputs = inputs[-(truncate + 1) * max_token_chars:]
        ids = tokenizer(inputs, add_special_tokens=False)["input_ids"]
        if len(ids) > truncate:
            inputs = tokenizer.decode(ids[-truncate:])
    if template_for_inputs and tokenizer.chat_template and not request.completion:
        user_turn = [{"role": "user", "content": inputs}]
        text = tokenizer.apply_chat_template(user_turn, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(inputs)["input_ids"]


def sampling_params(request: GenerateRequest, max_new_tokens: int, seed: int | None):
    """TGI's (and OpenAI's) parameters as vLLM's SamplingParams."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    p = request.params
    sampling = p.sampling
    grammar = None
    if p.grammar is not None and p.grammar.kind == "regex":
        grammar = StructuredOutputsParams(regex=p.grammar.value)
    elif p.grammar is not None and p.grammar.value is not None:
        grammar = StructuredOutputsParams(json=p.grammar.value)
    elif p.grammar is not None:
        grammar = StructuredOutputsParams(json_object=True)
    wants_logprobs = request.stream or p.details or p.best_of > 1 or p.logprobs
    return SamplingParams(
        n=p.best_of,
        temperature=(p.temperature or 1.0) if sampling else 0.0,
        top_p=(p.top_p or 1.0) if sampling else 1.0,
        top_k=(p.top_k or 0) if sampling else 0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        presence_penalty=p.presence_penalty or 0.0,
        seed=seed,
        stop=list(p.stop) or None,
        include_stop_str_in_output=True,  # TGI keeps the stop sequence in the text
        max_tokens=max_new_tokens,
        logprobs=p.top_n_tokens if p.top_n_tokens else (0 if wants_logprobs else None),
        prompt_logprobs=0 if p.decoder_input_details else None,
        structured_outputs=grammar,
        output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
    )


def add_output(sequence: SequenceOutput, output, plan: Plan, special_ids: set[int], decode) -> list[dict]:
    """Add one vLLM CompletionOutput (a delta when streaming, everything otherwise) and return its new
    tokens as stream events. A delta can carry several tokens but one text: the text goes on its last
    token that is not special, so the streamed texts add up to the final text exactly, stop sequence
    included."""
    ids = list(output.token_ids)
    logprobs = output.logprobs or [None] * len(ids)
    top_n = plan.sampling.logprobs or 0  # 0: only the chosen token's logprob was asked for
    carrier = max((i for i, token_id in enumerate(ids) if token_id not in special_ids), default=len(ids) - 1)
    events = []
    for position, (token_id, entry) in enumerate(zip(ids, logprobs)):
        chosen = entry.get(token_id) if entry else None
        token = {"id": token_id, "text": output.text if position == carrier else "",
                 "logprob": chosen.logprob if chosen is not None else None, "special": token_id in special_ids}
        top = _top_tokens(entry, top_n, special_ids) if top_n and entry else None
        if top is not None:
            sequence.top_tokens.append(top)
        sequence.tokens.append(token)
        events.append({"token": token, "top_tokens": top})
    sequence.text += output.text
    if output.cumulative_logprob is not None:
        sequence.cumulative_logprob = output.cumulative_logprob
    if output.finish_reason is not None:
        sequence.finish_reason = finish_reason(output.finish_reason, output.stop_reason)
        if plan.wants_tokens and not plan.stream:
            ids = [t["id"] for t in sequence.tokens]
            for token, text in zip(sequence.tokens, token_texts(decode, ids, sequence.text, plan.prompt_ids[-4:])):
                token["text"] = text
    return events


def _top_tokens(entry: dict, top_n: int, special_ids: set[int]) -> list[dict]:
    ranked = sorted((lp.rank, i, lp) for i, lp in entry.items() if lp.rank <= top_n)
    return [{"id": i, "text": lp.decoded_token or "", "logprob": lp.logprob, "special": i in special_ids}
            for _, i, lp in ranked]


def result(plan: Plan, sequences: dict[int, SequenceOutput], prefill: list, cached_tokens: int = 0) -> GenerateResult:
    """The whole answer, once every sequence has finished (GenerationError if the engine dropped one).
    `cached_tokens`: vLLM's num_cached_tokens, the prompt's tokens its prefix cache held."""
    done = [sequences[i] for i in sorted(sequences)]
    if not done or any(s.finish_reason is None for s in done):
        raise GenerationError("the engine aborted the request")
    if plan.pick_best:
        done.sort(key=lambda s: s.cumulative_logprob, reverse=True)
    answers = [Sequence(s.text, s.finish_reason, len(s.tokens), s.tokens, s.top_tokens or None) for s in done]
    return GenerateResult(answers[0], len(plan.prompt_ids), plan.seed, prefill, answers[1:], cached_tokens)


def prefill(prompt_ids: list[int], prompt_logprobs, decode) -> list[dict]:
    """TGI's details.prefill: every prompt token with its logprob (the first has none)."""
    tokens = []
    for token_id, entry in zip(prompt_ids, prompt_logprobs):
        chosen = entry.get(token_id) if entry else None
        tokens.append({"id": token_id, "text": decode([token_id]),
                       "logprob": chosen.logprob if chosen is not None else None})
    return tokens


def finish_reason(reason: str, stop_reason) -> str:
    """vLLM's finish reason in TGI's words: a stop string is TGI's stop_sequence; EOS or a stop token id is
    eos_token."""
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"
    raise GenerationError(f"the engine ended the request: {reason}")


def token_texts(decode, ids: list[int], final: str, context: list[int] = ()) -> list[str]:
    """Each token's text, such that the texts add up to `final` (the engine's text, cut after a stop
    sequence). Incremental: two short decodes per token starting at the same token, so a tokenizer's
    quirks at the start of a decode cancel out; the last prompt tokens (`context`) start the first
    window, so a tokenizer that drops a leading space at the start of a decode (SentencePiece) keeps
    it, as the engine's text does. A trailing U+FFFD (a character still incomplete) waits for the next
    token."""
    ids = list(context) + list(ids)
    texts, prefix, read = [], 0, len(context)
    for end in range(len(context) + 1, len(ids) + 1):
        before = decode(ids[prefix:read], skip_special_tokens=True)
        after = decode(ids[prefix:end], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            texts.append(after[len(before):])
            prefix, read = read, end
        else:
            texts.append("")
    clipped, used = [], 0
    for text in texts:  # a stop sequence can end inside a token: cut the texts where `final` ends
        clipped.append(final[used:used + len(text)] if used < len(final) else "")
        used += len(clipped[-1])
    if used < len(final):
        clipped[-1] += final[used:]
    return clipped
