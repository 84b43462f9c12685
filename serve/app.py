"""The Flask app: routes parse and validate, call the engine, serialize. Nothing here knows vLLM or torch.

SageMaker routes only `GET /ping` and `POST /invocations`; `/invocations` speaks TGI's schema (and
OpenAI's chat, routed on `messages`). For `docker run` users the same handlers also answer TGI's own
routes: `/generate`, `/generate_stream`, `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
`/info`, `/health`, `/metrics` (Prometheus text), and `POST /` (what TGI's Python client calls).

This is the serving side's one exception boundary: every error becomes `{"error", "error_type"}` JSON
with its status (TGI's body), so no client mistake is ever a 500. Once a stream has started, an error
is sent as a last SSE event with the same body.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections import Counter, deque
from typing import Protocol

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from serve import openai, tgi
from serve.adapters import Adapter, Adapters
from serve.admission import Ticket
from serve.custom import CustomHandlers
from serve.errors import (BadRequest, ClientGone, GenerationError, NotAcceptable, NotReady, Overloaded, ServeError,
                          UnsupportedMediaType, ValidationError, not_finished)
from serve.schemas import (ADAPTER_HEADER, MAX_BEST_OF, MAX_STOP_SEQUENCES, MAX_TOP_N_TOKENS, GenerateRequest,
                           GenerateResult, bind_to_adapter_header, parse_chat, parse_completion, parse_generate,
                           parse_request)
from serve.startup import Startup
from serve.translate import Limits

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 6 * 1024 * 1024  # InvokeEndpoint's payload limit
JSON_TYPES = ("application/json", "")
JSONLINES_TYPES = ("application/jsonlines", "application/x-jsonlines", "application/jsonl")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}"
MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}(\s*;\s*{_TOKEN}={_TOKEN})*")  # one type/subtype, with parameters
REALTIME_JSONLINES_SHARE = 4  # on a real-time endpoint a jsonlines body holds at most 1/4 of the slots at once


class Engine(Protocol):
    """All the app knows of an engine: serve/engine.py's (vLLM) or serve/predict.py's (a custom predict_fn);
    tests/unit/test_app.py's in-memory one."""

    limits: Limits

    @property
    def state(self) -> str:
        """"loading", "ready" or "failed" (after a fatal fault: the worker is about to restart)."""

    @property
    def capacity(self) -> int:
        """Requests admitted at once now (lowered after an out-of-memory fault)."""

    def submit(self, request: GenerateRequest, wait: float = 0.0) -> Ticket:
        """Admit and start one generation; Overloaded when no slot frees up within `wait` seconds."""

    def predict(self, data: object) -> object:
        """A custom predict_fn's answer to `data`."""

    def load_adapter(self, adapter: Adapter) -> None: ...

    def unload_adapter(self, adapter: Adapter) -> None: ...

    def shutdown(self) -> None: ...


def create_app(engine: Engine, adapters: Adapters, startup: Startup) -> Flask:
    app = Flask("serve")
    config = startup.config
    # A batch transform mini-batch is up to MaxPayloadInMB (at most 100 MB); a real-time body up to 6 MB.
    batch_bytes = config.execution_parameters["MaxPayloadInMB"] * 2**20 if config.batch else 0
    app.config["MAX_CONTENT_LENGTH"] = max(MAX_BODY_BYTES, batch_bytes)
    app.extensions["engine"] = engine  # gunicorn's worker_exit hook shuts it down
    metrics = Metrics()

    def check_ready() -> None:
        if engine.state == "loading":
            raise NotReady("model is loading")

    def generate(generate_request: GenerateRequest, one_object: bool = False) -> Response:
        check_ready()
        generate_request = bind_to_adapter_header(generate_request, request.headers.get(ADAPTER_HEADER))
        return _generate(engine, generate_request, config.timeout, config.stream_timeout, metrics, one_object)

    @app.get("/ping")
    def ping():
        state = engine.state
        if state == "loading":
            return _error(503, "healthcheck", "model is loading")
        if state == "failed":
            return _error(500, "healthcheck", "the engine has failed")
        return Response(status=200)

    @app.get("/health")
    def health():
        return ping()

    @app.get("/execution-parameters")
    def execution_parameters():
        """Batch transform asks this once, for what the job leaves unset (serve/config.py says how they
        are chosen: within SageMaker's 100 MB product, sized to finish inside the invocation timeout)."""
        return _json(200, config.execution_parameters)

    @app.get("/info")
    def info():
        """TGI's /info, with the values this server enforces."""
        return _json(200, {"model_id": startup.spec.base_model, "model_dtype": config.dtype,
                           "model_device_type": "vllm", "max_input_tokens": engine.limits.max_input_tokens,
                           "max_total_tokens": engine.limits.max_total_tokens, "max_best_of": MAX_BEST_OF,
                           "max_stop_sequences": MAX_STOP_SEQUENCES, "max_top_n_tokens": MAX_TOP_N_TOKENS,
                           "max_concurrent_requests": config.max_concurrent_requests,
                           "adapters": adapters.names(), "router": "llm-twin", "version": "0.1.0"})

    @app.get("/v1/models")
    def models():
        return _json(200, openai.models(adapters.names()))

    @app.post("/adapters")
    def register_adapter():
        """SageMaker creating an adapter inference component (serve/adapters.py): `name` and `src` in a JSON
        body (application/json only: a web page cannot send that to a local container cross-origin)."""
        check_ready()
        if request.mimetype != "application/json":
            raise UnsupportedMediaType('POST /adapters takes a JSON body (Content-Type: application/json): '
                                       '{"name": "alice", "src": "/opt/ml/models/alice"}')
        fields = _object(_body())
        missing = [key for key in ("name", "src") if not isinstance(fields.get(key), str) or not fields[key]]
        if missing:
            raise BadRequest(f"registering an adapter needs {' and '.join(missing)} (strings): "
                             '{"name": "alice", "src": "/path/to/adapter"}')
        return _json(200, adapters.register(fields["name"], fields["src"], engine.load_adapter))

    @app.delete("/adapters/<name>")
    def unregister_adapter(name: str):
        check_ready()
        adapters.unregister(name, engine.unload_adapter)
        return _json(200, {"name": name})

    @app.get("/metrics")
    def prometheus():
        admission = f"# TYPE llm_twin_admission_limit gauge\nllm_twin_admission_limit {engine.capacity}\n"
        return Response(metrics.text() + admission, mimetype="text/plain; version=0.0.4")

    @app.post("/invocations")
    @app.post("/")
    def invocations():
        check_ready()
        if startup.custom is not None:
            return _custom(engine, startup.custom, config.timeout)
        if request.mimetype in JSONLINES_TYPES:
            in_flight = engine.capacity if config.batch else max(1, engine.capacity // REALTIME_JSONLINES_SHARE)
            return _jsonlines(engine, request.get_data(cache=False), config.timeout, in_flight)
        return generate(parse_request(_body()))

    @app.post("/generate")
    def tgi_generate():
        return generate(parse_generate({**_object(_body()), "stream": False}), one_object=True)

    @app.post("/generate_stream")
    def tgi_generate_stream():
        return generate(parse_generate({**_object(_body()), "stream": True}))

    @app.post("/v1/chat/completions")
    def chat_completions():
        return generate(parse_chat(_object(_body())))

    @app.post("/v1/completions")
    def completions():
        return generate(parse_completion(_body()))

    @app.errorhandler(ServeError)
    def serve_error(e: ServeError):
        metrics.count(e.status)
        return _error(e.status, e.error_type, e.message)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return _error(e.code or 500, e.name.lower().replace(" ", "_"), e.description or e.name)

    @app.errorhandler(TimeoutError)
    def timeout_error(e):
        metrics.count(424)
        return _error(424, "generation", f"{e} (SAGEMAKER_MODEL_SERVER_TIMEOUT): stream the answer, ask for fewer "
                      "max_new_tokens, or use an asynchronous endpoint")

    return app


class Metrics:
    """Request counts for /metrics, in TGI's metric names where TGI has one."""

    def __init__(self):
        self._lock = threading.Lock()
        self._statuses: Counter = Counter()
        self._generated_tokens = 0

    def count(self, status: int, generated_tokens: int = 0) -> None:
        with self._lock:
            self._statuses[status] += 1
            self._generated_tokens += generated_tokens

    def text(self) -> str:
        with self._lock:
            statuses, tokens = dict(self._statuses), self._generated_tokens
        success = sum(n for status, n in statuses.items() if status < 400)
        lines = ["# TYPE tgi_request_count counter", f"tgi_request_count {sum(statuses.values())}",
                 "# TYPE tgi_request_success counter", f"tgi_request_success {success}",
                 "# TYPE tgi_request_failure counter", f"tgi_request_failure {sum(statuses.values()) - success}",
                 "# TYPE tgi_request_generated_tokens_total counter", f"tgi_request_generated_tokens_total {tokens}",
                 "# TYPE llm_twin_responses_total counter"]
        lines += [f'llm_twin_responses_total{{status="{status}"}} {n}' for status, n in sorted(statuses.items())]
        return "\n".join(lines) + "\n"


def _body():
    if request.mimetype not in JSON_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {request.mimetype!r} is not supported: send application/json or application/jsonlines")
    return _parse_json(request.get_data(cache=False))


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise ValidationError("request body must be a JSON object")
    return body


def _parse_json(data: bytes):
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, too many digits, too deep
        raise BadRequest(f"request body is not valid JSON: {type(e).__name__}: {e}") from None


def _generate(engine: Engine, generate: GenerateRequest, timeout: float, stream_timeout: float, metrics: Metrics,
              one_object: bool = False) -> Response:
    """one_object: TGI's /generate answers the item itself, not a list of one. A stream has its own timeout.
    A client that leaves a stream stops it at the next write; one that leaves a plain request is noticed
    while it waits (gunicorn gives the connection's socket), and its generation is aborted."""
    ticket = engine.submit(generate)
    if generate.stream:
        return _stream(ticket, generate, stream_timeout, metrics)
    sock = request.environ.get("gunicorn.socket")
    try:
        result = ticket.result(timeout, client_gone=lambda: _client_gone(sock))
    except ClientGone:
        log.info("client left before its answer: generation aborted")
        metrics.count(499)
        return Response(status=499)
    metrics.count(200, result.generated_tokens)
    answer = _response(generate, result)
    return _json(200, answer[0] if one_object else answer)


def _client_gone(sock) -> bool:
    """True once the client has closed its connection: its socket reads as ended. A client that sent more
    (its next keep-alive request) is still there; one that only shut its sending side is taken as gone,
    as nginx does. A socket this cannot look at (none, or TLS) is taken as still there."""
    if sock is None:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:  # nothing to read: still connected
        return False
    except ValueError:  # e.g. an SSL socket, which takes no flags
        return False
    except OSError:  # reset by the peer
        return True


def _openai_shaped(generate: GenerateRequest) -> bool:
    return generate.messages is not None or generate.completion


def _response(generate: GenerateRequest, result: GenerateResult):
    return openai.response(generate, result) if _openai_shaped(generate) else tgi.response(generate, result)


def _stream(ticket: Ticket, generate: GenerateRequest, timeout: float, metrics: Metrics) -> Response:
    """SSE in the request's dialect. Nothing is sent before the first event: a request that fails before
    it gets a 4xx/424 of its own; one that fails later ends with an error event of the same body."""
    events = ticket.stream(timeout)
    first = next(events)
    if first[0] == "error":
        events.close()
        raise first[1]

    def engine_events():
        for kind, payload in _chain(first, events):
            if kind == "error":
                raise payload
            if kind == "done":
                metrics.count(200, payload.generated_tokens)
            yield kind, payload

    def body():
        try:
            if _openai_shaped(generate):
                yield from (_sse(chunk) for chunk in openai.stream(generate, engine_events()))
                yield "data: [DONE]\n\n"
            else:
                yield from (_sse(event) for event in tgi.stream(generate, engine_events()))
        except ServeError as e:
            yield _sse({"error": e.message, "error_type": e.error_type})
        except TimeoutError as e:
            yield _sse({"error": str(e), "error_type": "generation"})
        finally:
            events.close()

    return Response(body(), mimetype="text/event-stream", headers=SSE_HEADERS)


def _custom(engine: Engine, custom: CustomHandlers, timeout: float) -> Response:
    """code/inference.py's handlers, each replacing the built-in step it names (serve/custom.py)."""
    accept = _accepted_type(request.headers.get("Accept", ""))
    data = request.get_data(cache=False)
    if "input_fn" in custom:
        try:
            data = custom["input_fn"](data, request.content_type or "application/json")
        except Exception as e:
            raise BadRequest(f"input_fn failed: {type(e).__name__}: {e}") from None
    else:
        data = _parse_json(data)
    if "predict_fn" in custom:  # its failures go through the engine's fault policy (serve/faults.py)
        prediction = engine.predict(data)
    else:
        generate = parse_request(data, request.headers.get(ADAPTER_HEADER))
        if generate.stream:
            raise ValidationError("'stream' is not available with custom input_fn/output_fn")
        prediction = _response(generate, engine.submit(generate).result(timeout))
    if "output_fn" not in custom:
        return _json(200, prediction)
    try:
        body = custom["output_fn"](prediction, accept)
    except Exception as e:
        raise GenerationError(f"output_fn failed: {type(e).__name__}: {e}") from None
    return Response(body, status=200, mimetype=accept, headers={"X-Content-Type-Options": "nosniff"})


def _accepted_type(accept: str) -> str:
    """The one media type output_fn is asked for: the client's Accept when it is a single type/subtype (with
    parameters), application/json when it is empty or */*. Anything else (a list, parameters, a malformed value) is a
    406 rather than a string copied into the response's Content-Type."""
    accept = accept.strip()
    if accept in ("", "*/*"):
        return "application/json"
    if not MEDIA_TYPE.fullmatch(accept):
        raise NotAcceptable(f"Accept must be one media type such as application/json (custom output_fn), got "
                            f"{accept[:100]!r}")
    return accept


def _jsonlines(engine: Engine, data: bytes, timeout: float, in_flight: int) -> Response:
    """Batch transform: one request per line, one JSON line per answer, in order, all within one timeout.
    At most `in_flight` of its lines run at once (all of the engine's slots in a batch transform job, a
    share of them on a real-time endpoint, where other clients must still get in).
    A line that is itself invalid gets an error line; every other line is answered. Lines wait for engine
    capacity instead of being refused: when no admission slot is free, this request first finishes its own
    oldest line, and only with none of its own in flight waits for another request's (a line frees its slot
    when the engine finishes it, read or not). Past the deadline nothing more is started."""
    lines = [line for line in data.splitlines() if line.strip()]
    if not lines:
        raise ValidationError("the jsonlines body has no lines")
    deadline = time.monotonic() + timeout
    answers: list = [None] * len(lines)
    pending: deque = deque()  # (line number, request, ticket), oldest first

    def finish_oldest():
        number, generate, ticket = pending.popleft()
        try:
            answer = _response(generate, ticket.result(max(0.0, deadline - time.monotonic())))
            answers[number] = answer[0] if isinstance(answer, list) else answer
        except ServeError as e:
            answers[number] = _line_error(number, e.message, e.error_type)
        except TimeoutError as e:
            answers[number] = _line_error(number, str(e), "generation")

    try:
        for number, line in enumerate(lines):
            if time.monotonic() >= deadline:  # no time left: nothing more is started
                answers[number] = _line_error(number, not_finished(timeout), "generation")
                continue
            try:
                generate = parse_request(_parse_json(line), request.headers.get(ADAPTER_HEADER))
                if generate.stream:
                    raise ValidationError("'stream' is not available in a jsonlines batch")
                if len(pending) >= in_flight:
                    finish_oldest()
                while True:
                    try:
                        wait = 0.0 if pending else max(0.001, deadline - time.monotonic())
                        pending.append((number, generate, engine.submit(generate, wait=wait)))
                        break
                    except Overloaded:
                        if not pending:
                            raise
                        finish_oldest()
            except ServeError as e:
                answers[number] = _line_error(number, e.message, e.error_type)
        while pending:
            finish_oldest()
    finally:
        for _, _, ticket in pending:  # frees the slots of any line not read to its end
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
