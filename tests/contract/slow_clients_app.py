"""What tests/contract/test_slow_clients.py serves with gunicorn: /ping, and /echo, which answers the body it
got (capped at BODY_CAP bytes, as serve/app.py caps /invocations'); QuickWorker is serve/worker.py's worker with
deadlines short enough for a test."""

from flask import Flask, request

from serve.worker import BufferingWorker

BODY_CAP = 1000

app = Flask("slow-clients")
app.config["MAX_CONTENT_LENGTH"] = BODY_CAP


@app.get("/ping")
def ping():
    return "pong"


@app.post("/echo")
def echo():
    return request.get_data()


class QuickWorker(BufferingWorker):
    request_deadline = 1.5
    stop_linger = 1.0
