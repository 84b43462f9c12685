"""Batch transform's body (and a jsonlines body on a real-time endpoint): one request per line, one answer each."""

from __future__ import annotations

import json
import time
from collections import deque

from flask import Response

from serve.answers import parse_json, response_payload
from serve.errors import Overloaded, ServeError, Unavailable, ValidationError, not_finished
from serve.schemas import parse_request
def answer_lines(engine, data: bytes, adapter_header: str | None, timeout: float, in_flight: int) -> Response:
    """Batch transform: one request per line, one JSON line per answer, in order, all within one timeout.
    At most `in_flight` of its lines run at once (all of the engine's slots in a batch transform job, a
    share of them on a real-time endpoint, where other clients must still get in).
    A line that is itself invalid gets an error line; every other line is answered. Lines wait for engine
    capacity instead of being refused: when no admission slot is free, this request first finishes its own
    oldest line, and only with none of its own in flight waits for another request's (a line frees its slot
    when the engine finishes it, read or not). Past the deadline nothing more is started. A worker stopping
    before the body is answered answers it all 503 (Unavailable), which SageMaker sends again."""
    lines = [line for line in data.splitlines() if line.strip()]
    if not lines:
        raise ValidationError("the jsonlines body has no lines")
    deadline = time.monotonic() + timeout
    answers: list = [None] * len(lines)
    pending: deque = deque()  # (line number, request, ticket), oldest first

    def finish_oldest():
        number, generate, ticket = pending.popleft()
        try:
            answer = response_payload(generate, ticket.result(max(0.0, deadline - time.monotonic())))
            answers[number] = answer[0] if isinstance(answer, list) else answer
        except Unavailable:
            raise
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
                generate = parse_request(parse_json(line), adapter_header)
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
            except Unavailable:
                raise
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
