"""The Flask app: routes parse and validate, call the engine, serialize. Nothing here knows torch.

This is the serving side's one exception boundary: every error becomes `{"error", "error_type"}` JSON
with its status (TGI's body), so no client mistake is ever a 500. Once a stream has started, an error
is sent as a last SSE event with the same body.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from serve.errors import BadRequest, GenerationError, NotReady, ServeError, UnsupportedMediaType, ValidationError
from serve.schemas import GenerateRequest, GenerateResult, parse_request

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 6 * 1024 * 1024  # InvokeEndpoint's payload limit
JSON_TYPES = ("application/json", "")
JSONLINES_TYPES = ("application/jsonlines", "application/x-jsonlines", "application/jsonl")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OPENAI_FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


def create_app(engine) -> Flask:
    app = Flask("serve")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    timeout = engine.config.timeout

    @app.get("/ping")
    def ping():
        if not engine.ready:
            return _error(503, "healthcheck", "model is loading")
        return Response(status=200)

    @app.get("/execution-parameters")
    def execution_parameters():
        """Batch transform asks this once: several records per request, answered line for line."""
        return _json(200, {"MaxConcurrentTransforms": engine.config.max_batch_size, "BatchStrategy": "MULTI_RECORD",
                           "MaxPayloadInMB": MAX_BODY_BYTES // 2**20})

    @app.post("/invocations")
    def invocations():
        if not engine.ready:
            raise NotReady("model is loading")
        if engine.custom is not None:
            return _custom(engine, timeout)
        if request.mimetype in JSONLINES_TYPES:
            return _jsonlines(engine, request.get_data(cache=False), timeout)
        if request.mimetype not in JSON_TYPES:
            raise UnsupportedMediaType(
                f"Content-Type {request.mimetype!r} is not supported: send application/json or application/jsonlines")
        generate = parse_request(_parse_json(request.get_data(cache=False)))
        ticket = engine.submit(generate)
        if generate.stream:
            return _stream(ticket, generate, timeout)
        return _json(200, _response(generate, ticket.result(timeout)))

    @app.errorhandler(ServeError)
    def serve_error(e: ServeError):
        return _error(e.status, e.error_type, e.message)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return _error(e.code or 500, e.name.lower().replace(" ", "_"), e.description or e.name)

    @app.errorhandler(TimeoutError)
    def timeout_error(e):
        return _error(424, "generation", "generation did not finish within the server timeout")

    return app


def _parse_json(data: bytes):
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, too many digits, too deep
        raise BadRequest(f"request body is not valid JSON: {type(e).__name__}: {e}") from None


def _response(generate: GenerateRequest, result: GenerateResult):
    if generate.messages is not None:
        return _chat_completion(result)
    text = generate.inputs + result.text if generate.params.return_full_text else result.text
    item = {"generated_text": text}
    if generate.params.details:
        item["details"] = _details(result)
    return [item]


def _details(result: GenerateResult) -> dict:
    return {"finish_reason": result.finish_reason, "generated_tokens": result.generated_tokens,
            "input_length": result.input_tokens, "seed": result.seed}


def _chat_completion(result: GenerateResult) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": "llm-twin",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": OPENAI_FINISH[result.finish_reason]}],
        "usage": {"prompt_tokens": result.input_tokens, "completion_tokens": result.generated_tokens,
                  "total_tokens": result.input_tokens + result.generated_tokens},
    }


def _stream(ticket, generate: GenerateRequest, timeout: float) -> Response:
    events = ticket.stream(timeout)
    first = next(events)
    if first[0] == "error":  # nothing sent yet: a proper 4xx/424 instead of an error event
        events.close()
        raise first[1]
    chat = generate.messages is not None

    def body():
        try:
            yield from (_chat_events if chat else _tgi_events)(generate, first, events)
        except ServeError as e:
            yield _sse({"error": e.message, "error_type": e.error_type})
        except TimeoutError as e:
            yield _sse({"error": str(e), "error_type": "generation"})
        finally:
            events.close()

    return Response(body(), mimetype="text/event-stream", headers=SSE_HEADERS)


def _tgi_events(generate, first, events):
    """TGI's stream: one event per token; the last also carries generated_text (and details if asked)."""
    held, index = None, 0
    for kind, payload in _chain(first, events):
        if kind == "error":
            raise payload
        if kind == "token":
            if held is not None:
                yield _sse(held)
            index += 1
            held = {"index": index, "token": payload, "generated_text": None, "details": None}
        elif kind == "done":
            text = generate.inputs + payload.text if generate.params.return_full_text else payload.text
            final = held or {"index": index, "token": None, "generated_text": None, "details": None}
            final["generated_text"] = text
            if generate.params.details:
                final["details"] = _details(payload)
            yield _sse(final)


def _chat_events(generate, first, events):
    """OpenAI's stream: chat.completion.chunk deltas, a last chunk with finish_reason and usage, [DONE]."""
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, finish=None, usage=None):
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": "llm-twin",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            body["usage"] = usage
        return _sse(body)

    yield chunk({"role": "assistant", "content": ""})
    for kind, payload in _chain(first, events):
        if kind == "error":
            raise payload
        if kind == "token" and payload["text"]:
            yield chunk({"content": payload["text"]})
        elif kind == "done":
            usage = {"prompt_tokens": payload.input_tokens, "completion_tokens": payload.generated_tokens,
                     "total_tokens": payload.input_tokens + payload.generated_tokens}
            yield chunk({}, OPENAI_FINISH[payload.finish_reason], usage)
    yield "data: [DONE]\n\n"


def _custom(engine, timeout: float) -> Response:
    """code/inference.py's handlers, each replacing the built-in step it names (serve/custom.py)."""
    custom = engine.custom
    accept = request.headers.get("Accept", "application/json")
    accept = "application/json" if accept in ("", "*/*") else accept
    data = request.get_data(cache=False)
    if "input_fn" in custom:
        try:
            data = custom["input_fn"](data, request.content_type or "application/json")
        except Exception as e:
            raise BadRequest(f"input_fn failed: {type(e).__name__}: {e}") from None
    else:
        data = _parse_json(data)
    if "predict_fn" in custom:
        try:
            prediction = engine.run_job(lambda model: custom["predict_fn"](data, model))
        except (ServeError, TimeoutError):
            raise
        except Exception as e:
            raise GenerationError(f"predict_fn failed: {type(e).__name__}: {e}") from None
    else:
        generate = parse_request(data)
        if generate.stream:
            raise ValidationError("'stream' is not available with custom input_fn/output_fn")
        prediction = _response(generate, engine.submit(generate).result(timeout))
    if "output_fn" not in custom:
        return _json(200, prediction)
    try:
        return Response(custom["output_fn"](prediction, accept), status=200, mimetype=accept)
    except Exception as e:
        raise GenerationError(f"output_fn failed: {type(e).__name__}: {e}") from None


def _jsonlines(engine, data: bytes, timeout: float) -> Response:
    """Batch transform: one request per line, one JSON line per answer, in order. A bad line gets an
    error line; the other lines are still answered."""
    lines = [line for line in data.splitlines() if line.strip()]
    if not lines:
        raise ValidationError("the jsonlines body has no lines")
    answers: list = [None] * len(lines)
    wave = engine.config.max_batch_size
    for start in range(0, len(lines), wave):
        tickets = {}
        try:
            for number in range(start, min(start + wave, len(lines))):
                try:
                    generate = parse_request(_parse_json(lines[number]))
                    if generate.stream:
                        raise ValidationError("'stream' is not available in a jsonlines batch")
                    tickets[number] = (generate, engine.submit(generate))
                except ServeError as e:
                    answers[number] = _line_error(number, e.message, e.error_type)
            for number, (generate, ticket) in tickets.items():
                try:
                    answer = _response(generate, ticket.result(timeout))
                    answers[number] = answer[0] if isinstance(answer, list) else answer
                except ServeError as e:
                    answers[number] = _line_error(number, e.message, e.error_type)
                except TimeoutError as e:
                    answers[number] = _line_error(number, str(e), "generation")
        finally:
            for _, ticket in tickets.values():  # frees the slots of any ticket not read to its end
                ticket.close()
    body = "".join(json.dumps(answer) + "\n" for answer in answers)
    return Response(body, status=200, mimetype="application/jsonlines")


def _line_error(number: int, message: str, error_type: str) -> dict:
    return {"error": f"line {number + 1}: {message}", "error_type": error_type}


def _chain(first, events):
    yield first
    yield from events


def _sse(payload: dict) -> str:
    return f"data:{json.dumps(payload)}\n\n"


def _json(status: int, payload) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


def _error(status: int, error_type: str, message: str) -> Response:
    return _json(status, {"error": message, "error_type": error_type})
