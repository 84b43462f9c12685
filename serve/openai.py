"""OpenAI's response shapes: chat completions and completions, whole and as stream chunks.

Every field that OpenAI's SDK, `huggingface_hub.InferenceClient` and TGI's own `text-generation`
client read is present (the last one requires `system_fingerprint`, `logprobs` and, in every delta,
`role`).
"""

from __future__ import annotations

import time
import uuid
from typing import Iterable, Iterator

from serve.schemas import MODEL_NAME, GenerateRequest, GenerateResult, Sequence

FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
FINGERPRINT = "llm-twin-vllm"


def usage(request: GenerateRequest, result: GenerateResult) -> dict:
    """OpenAI's counts. The prompt's cached tokens only for a salted request (a session's turn, or one with a
    cache_salt): it shares cached blocks with its own salt's requests alone, while an unsalted count would tell
    any caller, to the block, whether another's prompt began as its own did (vLLM's server too leaves them out
    unless told)."""
    completion = sum(s.generated_tokens for s in [result.best, *result.others])
    counts = {"prompt_tokens": result.input_tokens, "completion_tokens": completion,
              "total_tokens": result.input_tokens + completion}
    if request.cache_salt:
        counts["prompt_tokens_details"] = {"cached_tokens": result.cached_tokens}
    return counts


def response(request: GenerateRequest, result: GenerateResult) -> dict:
    """The whole answer: one choice per sequence (OpenAI's `n`)."""
    sequences = [result.best, *result.others]
    if request.completion:
        choices = [{"index": i, "text": s.text, "logprobs": None, "finish_reason": FINISH[s.finish_reason]}
                   for i, s in enumerate(sequences)]
        return _envelope("cmpl", "text_completion", request, choices, usage=usage(request, result))
    choices = [{"index": i, "message": {"role": "assistant", "content": s.text},
                "logprobs": _logprobs(s) if request.params.logprobs else None,
                "finish_reason": FINISH[s.finish_reason]} for i, s in enumerate(sequences)]
    return _envelope("chatcmpl", "chat.completion", request, choices, usage=usage(request, result))


def stream(request: GenerateRequest, events: Iterable[tuple[str, object]]) -> Iterator[dict]:
    """A stream's chunks, from the engine's "token" and "done" events (the caller sends `[DONE]` after them)."""
    chunks = Chunks(request)
    first = chunks.first()
    if first is not None:
        yield first
    for kind, payload in events:
        if kind == "token":
            chunk = chunks.token(payload["token"], payload["top_tokens"])
            if chunk is not None:
                yield chunk
        elif kind == "done":
            yield chunks.last(payload)


class Chunks:
    """A stream's chunks: the first (the role), one per token text, the last (finish_reason and usage). With
    logprobs, each chunk has an entry for every token since the previous chunk: a token without text of its
    own (a piece of a character, a special token) goes with the next chunk, as in the whole answer."""

    def __init__(self, request: GenerateRequest):
        self.request = request
        self.ident = f"{'cmpl' if request.completion else 'chatcmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._entries: list[dict] = []  # logprob entries not yet sent

    def first(self) -> dict | None:
        return None if self.request.completion else self._chunk({"role": "assistant", "content": ""})

    def token(self, token: dict, top: list[dict] | None) -> dict | None:
        if self.request.params.logprobs:
            self._entries.append(_entry(token, top or []))
        if not token["text"]:
            return None
        if self.request.completion:
            return self._chunk({"text": token["text"]})
        return self._chunk({"role": "assistant", "content": token["text"]}, logprobs=self._logprobs())

    def last(self, result: GenerateResult) -> dict:
        finish = FINISH[result.finish_reason]
        body = self._chunk({"text": ""} if self.request.completion else {"role": "assistant"}, finish,
                           logprobs=self._logprobs() if self._entries else None)
        body["usage"] = usage(self.request, result)
        return body

    def _logprobs(self) -> dict | None:
        if not self.request.params.logprobs:
            return None
        entries, self._entries = self._entries, []
        return {"content": entries}

    def _chunk(self, delta: dict, finish: str | None = None, logprobs=None) -> dict:
        kind = "text_completion" if self.request.completion else "chat.completion.chunk"
        choice = {"index": 0, **delta, "finish_reason": finish, "logprobs": logprobs} if self.request.completion \
            else {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.request.model or MODEL_NAME,
                "system_fingerprint": FINGERPRINT, "choices": [choice]}


def models(adapters: list[str]) -> dict:
    created = int(time.time())
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": MODEL_NAME}
                                       for name in [MODEL_NAME, *adapters]]}


def _envelope(prefix: str, kind: str, request: GenerateRequest, choices: list, usage: dict) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": request.model or MODEL_NAME, "system_fingerprint": FINGERPRINT, "choices": choices, "usage": usage}


def _logprobs(sequence: Sequence) -> dict:
    tops = sequence.top_tokens or [[] for _ in sequence.tokens]
    return {"content": [_entry(token, top) for token, top in zip(sequence.tokens, tops)]}


def _entry(token: dict, top: list[dict]) -> dict:
    return {"token": token["text"], "logprob": token["logprob"], "bytes": list(token["text"].encode()),
            "top_logprobs": [{"token": t["text"], "logprob": t["logprob"], "bytes": list(t["text"].encode())}
                             for t in top]}
