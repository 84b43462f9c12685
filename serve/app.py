"""The Flask app: routes parse and validate, call the engine, serialize. Nothing here knows torch.

This is the serving side's one exception boundary: every error becomes `{"error", "error_type"}` JSON
with its status (TGI's body), so no client mistake is ever a 500.
"""

from __future__ import annotations

import json
import logging

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from serve.errors import BadRequest, NotReady, ServeError, UnsupportedMediaType
from serve.schemas import parse_generate

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 6 * 1024 * 1024  # InvokeEndpoint's payload limit
JSON_TYPES = ("application/json", "")


def create_app(engine) -> Flask:
    app = Flask("serve")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.get("/ping")
    def ping():
        if not engine.ready:
            return _error(503, "healthcheck", "model is loading")
        return Response(status=200)

    @app.post("/invocations")
    def invocations():
        if request.mimetype not in JSON_TYPES:
            raise UnsupportedMediaType(f"Content-Type {request.mimetype!r} is not supported: send application/json")
        try:
            body = json.loads(request.get_data(cache=False))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        generate = parse_generate(body)
        if not engine.ready:
            raise NotReady("model is loading")
        result = engine.generate(generate)
        item = {"generated_text": result.text}
        if generate.params.details:
            item["details"] = {
                "finish_reason": result.finish_reason,
                "generated_tokens": result.generated_tokens,
                "input_length": result.input_tokens,
                "seed": result.seed,
            }
        return _json(200, [item])

    @app.errorhandler(ServeError)
    def serve_error(e: ServeError):
        return _error(e.status, e.error_type, e.message)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return _error(e.code or 500, e.name.lower().replace(" ", "_"), e.description or e.name)

    @app.errorhandler(TimeoutError)
    def timeout(e):
        return _error(424, "generation", "generation did not finish within the server timeout")

    return app


def _json(status: int, payload) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


def _error(status: int, error_type: str, message: str) -> Response:
    return _json(status, {"error": message, "error_type": error_type})
