"""What tests/contract/test_slow_clients.py serves with gunicorn: /ping (answered by serve/worker.py's main loop
from `ping_answer`; by the route, "pong", where a thread has it), /echo, which answers the body it got (capped at
BODY_CAP bytes, as serve/app.py caps /invocations'), and /hold, which keeps its thread until a file exists;
QuickWorker is serve/worker.py's worker with deadlines short enough for a test."""

import threading
import time
from pathlib import Path

from flask import Flask, request

from serve.worker import BufferingWorker

BODY_CAP = 1000

app = Flask("slow-clients")
app.config["MAX_CONTENT_LENGTH"] = BODY_CAP
app.extensions["ping_answer"] = lambda: (200, b"")


@app.get("/ping")
def ping():
    return "pong"


@app.get("/hold")
def hold():
    """Marks that a thread holds this request (`until`.THREAD), then keeps the thread until `until` exists."""
    until = Path(request.args["until"])
    until.with_name(f"{until.name}.{threading.get_ident()}").touch()
    deadline = time.monotonic() + 60
    while not until.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return "released"


@app.post("/echo")
def echo():
    return request.get_data()


class QuickWorker(BufferingWorker):
    request_deadline = 5.0  # seconds, not the real 60: yet room for a loaded machine's round trips
    stop_linger = 1.0
    min_buffer_bytes, buffer_bodies = 0, 2  # requests arriving hold at most two bodies' bytes (2000) at once
