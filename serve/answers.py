"""A generation's answer in the caller's dialect: one JSON body, SSE events, or WebSocket messages.

TGI's dialect for TGI-shaped requests, OpenAI's for chat and completions. A stream sends its events as
they come: OpenAI's chunks then `[DONE]`, or TGI's token events, the last one with the generated text. When
the request is a session's turn (serve/sessions.py), the turn is recorded once its answer is whole, and
given up (its lock released, nothing recorded) when the answer fails or its client leaves.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Iterator

from flask import Response, request

from serve import openai, tgi
from serve.admission import Ticket
from serve.errors import BadRequest, ClientGone, ServeError
from serve.hangups import HangUps
from serve.metrics import Metrics
from serve.schemas import GenerateRequest, GenerateResult
from serve.sessions import Turn

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "[DONE]"  # OpenAI's last stream event
hang_ups = HangUps()  # this worker's watch on the clients of plain requests that wait


def answer(engine, generate: GenerateRequest, timeout: float, stream_timeout: float, metrics: Metrics,
           one_object: bool = False, turn: Turn | None = None) -> Response:
    """one_object: TGI's /generate answers the item itself, not a list of one. A stream has its own timeout.
    A client that leaves a stream stops it at the next write; one that leaves before anything was written (a
    plain request, a stream before its first event) is noticed while it waits (gunicorn gives the connection's
    socket), and its generation is aborted."""
    streaming = False
    try:
        ticket = engine.submit(generate)
        try:
            with hang_ups.watch(request.environ.get("gunicorn.socket"), ticket.hang_up):
                if generate.stream:
                    response = _stream(ticket, generate, stream_timeout, metrics, turn)  # has its first event
                    streaming = True  # the response releases the turn when it ends
                    return response
                result = ticket.result(timeout)
        except ClientGone:
            log.info("client left before its answer: generation aborted")
            metrics.count(499)
            return Response(status=499)
        metrics.count(200, result.generated_tokens)
        if turn is not None:
            turn.answered(result.text)
        payload = response_payload(generate, result)
        return json_response(200, payload[0] if one_object else payload)
    finally:
        if turn is not None and not streaming:
            turn.release()


def send_answer(engine, generate: GenerateRequest, timeout: float, metrics: Metrics, turn: Turn | None,
                send: Callable[[object], None]) -> None:
    """The answer as WebSocket messages: the stream's events as SSE has them (a plain request's whole answer
    as one message). Errors are raised for the caller to send.
    A client gone raises ClientGone: from `send`, or, while nothing is sent (a plain answer, a stream before its
    first token), from the connection's hang-up watch (the TCP connection closed: a close frame alone is not
    read until the answer ends, and a client library drops the connection a few seconds after sending one)."""
    try:
        ticket = engine.submit(generate)
        with hang_ups.watch(request.environ.get("gunicorn.socket"), ticket.hang_up):
            if not generate.stream:
                result = ticket.result(timeout)
                metrics.count(200, result.generated_tokens)
                if turn is not None:
                    turn.answered(result.text)
                send(response_payload(generate, result))
                return
            events = ticket.stream(timeout)
            try:
                for payload in _dialect_events(generate, events, metrics, turn):
                    send(payload)
            finally:
                events.close()  # gives the generation up when `send` found the client gone
    finally:
        if turn is not None:
            turn.release()


def response_payload(generate: GenerateRequest, result: GenerateResult):
    return openai.response(generate, result) if _openai_shaped(generate) else tgi.response(generate, result)


def parse_json(data: bytes):
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, too many digits, too deep
        raise BadRequest(f"request body is not valid JSON: {type(e).__name__}: {e}") from None


def json_response(status: int, payload, headers: dict | None = None) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json", headers=headers)


def error_response(status: int, error_type: str, message: str) -> Response:
    return json_response(status, {"error": message, "error_type": error_type})


def _openai_shaped(generate: GenerateRequest) -> bool:
    return generate.messages is not None or generate.completion


def _stream(ticket: Ticket, generate: GenerateRequest, timeout: float, metrics: Metrics, turn: Turn | None) -> Response:
    """SSE in the request's dialect. Nothing is sent before the first event: a request that fails before
    it gets a 4xx/424 of its own; one that fails later ends with an error event of the same body."""
    events = ticket.stream(timeout)
    first = next(events)
    if first[0] == "error":
        events.close()
        raise first[1]

    def body():
        try:
            for payload in _dialect_events(generate, _chain(first, events), metrics, turn):
                yield "data: [DONE]\n\n" if payload == DONE else _sse(payload)
        except ServeError as e:
            yield _sse({"error": e.message, "error_type": e.error_type})
        except TimeoutError as e:
            yield _sse({"error": str(e), "error_type": "generation"})
        except ClientGone:  # it left just as its first event came: nobody to write to
            return

    def ended() -> None:  # also when the body was never read
        events.close()
        if turn is not None:
            turn.release()

    response = Response(body(), mimetype="text/event-stream", headers=SSE_HEADERS)
    response.call_on_close(ended)
    return response


def _dialect_events(generate: GenerateRequest, events, metrics: Metrics, turn: Turn | None) -> Iterator:
    """The engine's events as the request's dialect streams them; an engine error is raised."""

    def engine_events():
        for kind, payload in events:
            if kind == "error":
                raise payload
            if kind == "done":
                metrics.count(200, payload.generated_tokens)
                if turn is not None:
                    turn.answered(payload.text)
            yield kind, payload

    if _openai_shaped(generate):
        yield from openai.stream(generate, engine_events())
        yield DONE
    else:
        yield from tgi.stream(generate, engine_events())


def _chain(first, events):
    yield first
    yield from events


def _sse(payload: dict) -> str:
    return f"data:{json.dumps(payload)}\n\n"
