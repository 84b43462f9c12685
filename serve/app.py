"""The Flask app: routes parse and validate, call the engine, serialize. Nothing here knows vLLM or torch.

SageMaker routes only `GET /ping` and `POST /invocations`; `/invocations` speaks TGI's schema (and
OpenAI's chat, routed on `messages`). For `docker run` users the same handlers also answer TGI's own
routes: `/generate`, `/generate_stream`, `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
`/info`, `/health`, `/metrics` (Prometheus text), and `POST /` (what TGI's Python client calls).
SageMaker's stateful sessions ride on any of them (serve/sessions.py), and its bidirectional streaming is a
WebSocket whose messages are the same requests (serve/bidirectional.py). serve/answers.py encodes answers.

This is the serving side's one exception boundary: every error becomes `{"error", "error_type"}` JSON
with its status (TGI's body), so no client mistake is ever a 500. Once a stream has started, an error
is sent as a last SSE event with the same body.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from typing import ContextManager, Protocol

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from serve import bidirectional, openai
from serve.adapters import ALIAS_HEADER, Adapter, Adapters, parse_registration
from serve.admission import Admission, Ticket
from serve.answers import answer, error_response, json_response, parse_json, response_payload, send_answer
from serve.custom import CustomHandlers
from serve.errors import (BadRequest, GenerationError, NotAcceptable, NotReady, ServeError,
                          UnsupportedMediaType, ValidationError)
from serve.schemas import (ADAPTER_HEADER, MAX_BEST_OF, MAX_STOP_SEQUENCES, MAX_TOP_N_TOKENS, GenerateRequest,
                           bind_to_adapter_header, parse_chat, parse_completion, parse_generate,
                           parse_request)
from serve.jsonlines import answer_lines
from serve.metrics import Metrics
from serve.sessions import (CLOSED_SESSION_HEADER, NEW_SESSION, NEW_SESSION_HEADER, SESSION_HEADER, Sessions, Turn,
                            request_type)
from serve.startup import Startup
from serve.translate import Limits

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 6 * 1024 * 1024  # InvokeEndpoint's payload limit
JSON_TYPES = ("application/json", "")
JSONLINES_TYPES = ("application/jsonlines", "application/x-jsonlines", "application/jsonl")
_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}"
MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}(\s*;\s*{_TOKEN}={_TOKEN})*")  # one type/subtype, with parameters
STOP_MARGIN_SECONDS = 5.0  # before gunicorn's kill: time for the last events to be written
STOPPED = ("the server is stopping (SageMaker is replacing or removing this instance) and could not finish this "
           "answer in time: send the request again")
REALTIME_JSONLINES_SHARE = 4  # on a real-time endpoint a jsonlines body holds at most 1/4 of the slots at once


class Engine(Protocol):
    """All the app knows of an engine: serve/engine.py's (vLLM) or serve/predict.py's (a custom predict_fn);
    tests/unit/test_app.py's in-memory one."""

    limits: Limits
    dtype: str  # the weights' type as the engine runs them ("torch.bfloat16", as TGI's /info); DTYPE's until loaded
    device_type: str  # where they run: "cuda" or "cpu" (TGI's /info), "unknown" until loaded

    @property
    def state(self) -> str:
        """"loading", "ready" or "failed" (after a fatal fault: the worker is about to restart)."""

    @property
    def capacity(self) -> int:
        """Requests admitted at once now (lowered after an out-of-memory fault)."""

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet done."""

    def submit(self, request: GenerateRequest, wait: float = 0.0) -> Ticket:
        """Admit and start one generation; Overloaded when no slot frees up within `wait` seconds."""

    def predict(self, data: object) -> object:
        """A custom predict_fn's answer to `data`."""

    def load_adapter(self, adapter: Adapter) -> ContextManager:
        """A registration: `adapter` loaded (and pinned) as it asks, held while the registry records it."""

    def unload_adapter(self, adapter: Adapter) -> None: ...

    def loaded_adapters(self) -> dict[int, tuple[str, bool]]:
        """The adapters in this worker's engine: version -> (name, pinned)."""

    def shutdown(self) -> None: ...

    admission: Admission  # its slots and tickets: stopping answers the tickets still running


def create_app(engine: Engine, adapters: Adapters, startup: Startup) -> Flask:
    app = Flask("serve")
    config = startup.config
    # A batch transform mini-batch is up to MaxPayloadInMB (at most 100 MB); a real-time body up to 6 MB.
    batch_bytes = config.batch_body_bytes if config.batch else 0
    app.config["MAX_CONTENT_LENGTH"] = max(MAX_BODY_BYTES, batch_bytes)
    app.extensions["engine"] = engine  # gunicorn's worker_exit hook shuts it down
    metrics = Metrics()
    sessions = (Sessions(startup.session_folder, config.sessions_expiration, config.max_sessions,
                         config.max_session_bytes, max_per_adapter=config.max_sessions_per_adapter)
                if startup.session_folder is not None else None)
    connections = bidirectional.Connections(config.max_bidirectional_streams,
                                            config.max_bidirectional_streams_per_adapter)

    def stopping(graceful_seconds: float) -> None:
        """The worker stops (serve/worker.py, on SIGTERM), and gunicorn kills it `graceful_seconds` later: idle
        WebSockets close now (1001), and what still runs STOP_MARGIN_SECONDS before the kill is answered 503,
        so no client's answer is cut off without a word."""
        connections.going_away()
        timer = threading.Timer(max(0.0, graceful_seconds - STOP_MARGIN_SECONDS), engine.admission.stop,
                                args=(STOPPED,))
        timer.daemon = True
        timer.start()

    app.extensions["stopping"] = stopping

    def check_ready() -> None:
        if engine.state == "loading":
            raise NotReady("model is loading")

    def prepare(generate_request: GenerateRequest, adapter: str | None,
                session_id: str | None) -> tuple[GenerateRequest, Turn | None]:
        """The request as SageMaker's headers bind it: to their adapter, and as the next turn of their session."""
        generate_request = bind_to_adapter_header(generate_request, adapter)
        if session_id is None:
            return generate_request, None
        turn = _sessions(sessions).turn(session_id, generate_request, adapters.requested(generate_request) or "")
        return turn.request, turn

    def session_request(body: dict, adapter: str | None, session_id: str | None) -> tuple[dict, dict]:
        """NEW_SESSION or CLOSE: the answer's body and headers."""
        kind = request_type(body)
        if kind == NEW_SESSION:
            session = _sessions(sessions).open(adapter or "")
            return ({"session_id": session.id, "expires": session.expires_at},
                    {NEW_SESSION_HEADER: f"{session.id}; Expires={session.expires_at}"})
        if not session_id:
            raise BadRequest(f"CLOSE needs the session's id in the {SESSION_HEADER} header")
        _sessions(sessions).close(session_id, adapter or "")
        return {"session_id": session_id, "closed": True}, {CLOSED_SESSION_HEADER: session_id}

    def generate(generate_request: GenerateRequest, one_object: bool = False) -> Response:
        check_ready()
        generate_request, turn = prepare(generate_request, request.headers.get(ADAPTER_HEADER),
                                         request.headers.get(SESSION_HEADER))
        return answer(engine, generate_request, config.timeout, config.stream_timeout, metrics, one_object, turn)

    def message(data: str | bytes, send: bidirectional.Send, headers, connection: dict) -> None:
        """One WebSocket message: a request (streamed unless it says "stream": false) or a session request;
        its answer as messages. An error is one message, and the connection stays open. A session opened on
        the connection is the one its next turns continue (as SageMaker's header would say)."""
        try:
            check_ready()
            body = parse_json(data.encode() if isinstance(data, str) else data)
            session_id = connection.get("session", headers.get(SESSION_HEADER))  # one opened here, else the upgrade's
            if isinstance(body, dict) and "requestType" in body:
                payload, _ = session_request(body, headers.get(ADAPTER_HEADER), session_id)
                connection["session"] = None if payload.get("closed") else payload["session_id"]
                send(payload)
                return
            implied = isinstance(body, dict) and "stream" not in body
            try:
                parsed = parse_request({**body, "stream": True} if implied else body)
            except ValidationError as e:
                if implied and "when 'stream' is true" in e.message:  # the client never said stream: say where from
                    raise ValidationError(f'{e.message} (a WebSocket message streams unless it says "stream": '
                                          "false)") from None
                raise
            generate_request, turn = prepare(parsed, headers.get(ADAPTER_HEADER), session_id)
            send_answer(engine, generate_request, config.stream_timeout, metrics, turn, send)
        except ServeError as e:
            metrics.count(e.status)
            send({"error": e.message, "error_type": e.error_type})
        except TimeoutError as e:
            metrics.count(424)
            send({"error": str(e), "error_type": "generation"})

    def ping_answer() -> tuple[int, bytes]:
        """/ping's status and body, from the engine's state. gunicorn's worker sends it from its main loop
        (serve/worker.py); the route answers the same where a thread has the request."""
        state = engine.state
        if state == "loading":
            return 503, json.dumps({"error": "model is loading", "error_type": "healthcheck"}).encode()
        if state == "failed":
            return 500, json.dumps({"error": "the engine has failed", "error_type": "healthcheck"}).encode()
        return 200, b""

    app.extensions["ping_answer"] = ping_answer

    @app.get("/ping")
    def ping():
        status, body = ping_answer()
        return Response(body, status=status, mimetype="application/json" if body else None)

    @app.get("/health")
    def health():
        return ping()

    @app.get("/execution-parameters")
    def execution_parameters():
        """Batch transform asks this once, for what the job leaves unset (serve/config.py says how they
        are chosen: within SageMaker's 100 MB product, sized to finish inside the invocation timeout)."""
        return json_response(200, config.execution_parameters)

    @app.get("/info")
    def info():
        """TGI's /info, with the values this server enforces."""
        return json_response(200, {"model_id": startup.spec.base_model, "model_dtype": engine.dtype,
                           "model_device_type": engine.device_type, "max_input_tokens": engine.limits.max_input_tokens,
                           "max_total_tokens": engine.limits.max_total_tokens, "max_best_of": MAX_BEST_OF,
                           "max_stop_sequences": MAX_STOP_SEQUENCES, "max_top_n_tokens": MAX_TOP_N_TOKENS,
                           "max_concurrent_requests": config.max_concurrent_requests,
                           "adapters": visible_adapters(), "router": "llm-twin", "version": "0.1.0"})

    @app.get("/v1/models")
    def models():
        return json_response(200, openai.models(visible_adapters()))

    def visible_adapters() -> list[str]:
        """The adapters this caller may name: with SageMaker's adapter header only that one (as GET /adapters);
        without it, LORA_ADAPTERS' (registered components answer only to their own header)."""
        only = request.headers.get(ADAPTER_HEADER)
        return sorted(adapters.fixed) if only is None else [only] if adapters.find(only) is not None else []

    @app.post("/adapters")
    def register_adapter():
        """SageMaker creating an adapter inference component (serve/adapters.py): `name`, `src`, `preload` and
        `pin` in a JSON body (application/json only: a web page cannot send that to a local container
        cross-origin). Registering a name again replaces its adapter in place."""
        check_ready()
        if request.mimetype != "application/json":
            raise UnsupportedMediaType('POST /adapters takes a JSON body (Content-Type: application/json): '
                                       '{"name": "alice", "src": "/opt/ml/models/alice"}')
        registration = parse_registration(_object(_body()))
        return json_response(200, adapters.register(**registration, load=engine.load_adapter,
                                                    alias=request.headers.get(ALIAS_HEADER)))

    @app.get("/adapters")
    def list_adapters():
        """The registered adapters, and whether this worker's engine has each loaded and pinned."""
        check_ready()
        return json_response(200, adapters.listing(engine.loaded_adapters, request.args,
                                                   only=request.headers.get(ADAPTER_HEADER)))

    @app.delete("/adapters/<name>")
    def unregister_adapter(name: str):
        check_ready()
        return json_response(200, adapters.unregister(name, engine.unload_adapter, request.headers.get(ALIAS_HEADER)))

    @app.get("/metrics")
    def prometheus():
        admission = (f"# TYPE llm_twin_admission_limit gauge\nllm_twin_admission_limit {engine.capacity}\n"
                     f"# TYPE llm_twin_requests_in_flight gauge\nllm_twin_requests_in_flight {engine.in_flight}\n")
        return Response(metrics.text() + admission, mimetype="text/plain; version=0.0.4")

    @app.post("/invocations")
    @app.post("/")
    def invocations():
        check_ready()
        if startup.custom is not None:
            return _custom(engine, startup.custom, config.timeout)
        if request.mimetype in JSONLINES_TYPES:
            if request.headers.get(SESSION_HEADER):
                raise BadRequest("a session's turn is one JSON request: JSON Lines are not recorded in a session "
                                 f"(drop the {SESSION_HEADER} header, or send one request)")
            in_flight = engine.capacity if config.batch else max(1, engine.capacity // REALTIME_JSONLINES_SHARE)
            return answer_lines(engine, request.get_data(cache=False), request.headers.get(ADAPTER_HEADER),
                                config.timeout, in_flight)
        body = _body()
        if isinstance(body, dict) and "requestType" in body:
            payload, headers = session_request(body, request.headers.get(ADAPTER_HEADER),
                                               request.headers.get(SESSION_HEADER))
            return json_response(200, payload, headers)
        return generate(parse_request(body))

    @app.get(bidirectional.ROUTE, websocket=True)  # werkzeug matches it to WebSocket upgrades only
    def bidirectional_stream():
        """SageMaker's InvokeEndpointWithBidirectionalStream (serve/bidirectional.py)."""
        check_ready()
        adapter = request.headers.get(ADAPTER_HEADER) or ""
        connections.take(adapter)
        try:
            headers, connection = request.headers, {}  # the upgrade's, for the connection's life
            return bidirectional.serve(request.environ, MAX_BODY_BYTES,
                                       lambda data, send: message(data, send, headers, connection),
                                       client_left=lambda: metrics.count(499), connections=connections)
        finally:
            connections.give_back(adapter)

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
        return error_response(e.status, e.error_type, e.message)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return error_response(e.code or 500, e.name.lower().replace(" ", "_"), e.description or e.name)

    @app.errorhandler(TimeoutError)
    def timeout_error(e):
        metrics.count(424)
        return error_response(424, "generation", f"{e} (SAGEMAKER_MODEL_SERVER_TIMEOUT): stream the answer, ask "
                              "for fewer max_new_tokens, or use an asynchronous endpoint")

    return app


def _body():
    if request.mimetype not in JSON_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {request.mimetype!r} is not supported: send application/json or application/jsonlines")
    return parse_json(request.get_data(cache=False))


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise ValidationError("request body must be a JSON object")
    return body


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
        data = parse_json(data)
    if "predict_fn" in custom:  # its failures go through the engine's fault policy (serve/faults.py)
        prediction = engine.predict(data)
    else:
        generate = parse_request(data, request.headers.get(ADAPTER_HEADER))
        if generate.stream:
            raise ValidationError("'stream' is not available with custom input_fn/output_fn")
        prediction = response_payload(generate, engine.submit(generate).result(timeout))
    if "output_fn" not in custom and "predict_fn" not in custom:
        return json_response(200, prediction)
    if "output_fn" not in custom:
        try:
            return Response(json.dumps(prediction, allow_nan=False), status=200, mimetype="application/json")
        except (TypeError, ValueError) as e:  # a set, a tensor, NaN...: not a JSON body
            raise GenerationError(f"predict_fn's result is not JSON ({type(e).__name__}: {e}): return lists, "
                                  "dicts, strings and numbers, or define output_fn") from None
    try:
        body = custom["output_fn"](prediction, accept)
    except Exception as e:
        raise GenerationError(f"output_fn failed: {type(e).__name__}: {e}") from None
    if not isinstance(body, (str, bytes, bytearray)):
        raise GenerationError(f"output_fn returned {type(body).__name__}: it must return the body, str or bytes")
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


def _sessions(sessions: Sessions | None) -> Sessions:
    if sessions is None:
        raise BadRequest("this endpoint keeps no sessions: deploy it with SAGEMAKER_ENABLE_STATEFUL_SESSIONS=true")
    return sessions
