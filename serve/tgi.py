"""TGI's response shapes: generate's answer (a list of one item, with `details` when asked) and its stream
events (one per token; the last also carries `generated_text`, and `details` when asked)."""

from __future__ import annotations

from typing import Iterable, Iterator

from serve.schemas import GenerateRequest, GenerateResult, Sequence


def response(request: GenerateRequest, result: GenerateResult) -> list[dict]:
    item = {"generated_text": _text(request, result)}
    if request.params.details:
        item["details"] = _details(result)
    return [item]


def stream(request: GenerateRequest, events: Iterable[tuple[str, object]]) -> Iterator[dict]:
    """The events of a stream, from the engine's "token" and "done" events. Each token's event is held
    back until the next one comes, so the last token's event can carry the whole text."""
    held, index = None, 0
    for kind, payload in events:
        if kind == "token":
            if held is not None:
                yield held
            index += 1
            held = {"index": index, "token": payload["token"], "top_tokens": payload["top_tokens"],
                    "generated_text": None, "details": None}
        elif kind == "done":
            final = held or {"index": index, "token": None, "generated_text": None, "details": None}
            final["generated_text"] = _text(request, payload)
            if request.params.details:
                final["details"] = {"finish_reason": payload.finish_reason,
                                    "generated_tokens": payload.generated_tokens,
                                    "input_length": payload.input_tokens, "seed": payload.seed}
            yield final


def _text(request: GenerateRequest, result: GenerateResult) -> str:
    return request.inputs + result.text if request.params.return_full_text else result.text


def _details(result: GenerateResult) -> dict:
    details = {**_sequence_details(result.best, result.seed), "input_length": result.input_tokens,
               "prefill": result.prefill}
    if result.others:
        details["best_of_sequences"] = [{"generated_text": s.text, **_sequence_details(s, None),
                                         "prefill": result.prefill} for s in result.others]
    return details


def _sequence_details(sequence: Sequence, seed: int | None) -> dict:
    details = {"finish_reason": sequence.finish_reason, "generated_tokens": sequence.generated_tokens,
               "seed": seed, "tokens": sequence.tokens}
    if sequence.top_tokens is not None:
        details["top_tokens"] = sequence.top_tokens
    return details
