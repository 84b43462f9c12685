"""SageMaker's bidirectional streaming (InvokeEndpointWithBidirectionalStream): a WebSocket on the serving port.

SageMaker opens a WebSocket to `/invocations-bidirectional-stream` (the image says it can with the label
`com.amazonaws.sagemaker.capabilities.bidirectional-streaming=true`), sends each request event's bytes as one
message (a text frame for UTF8 events, binary otherwise), pings every 60 s, and turns each message the
container sends into a response event of the same type. The connection lasts many turns.

gunicorn's thread for the upgrade request keeps the connection for its whole life: the handshake is answered
here with the `websockets` library's sans-I/O protocol over gunicorn's socket, then its threaded connection
(which answers pings and reads frames in its own thread) carries the messages, and `answer` (the app's) turns
each message into its answer's messages. When the client closes, gunicorn is told to close the socket and
write nothing: the route answers an `UpgradedResponse`.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Callable

from flask import Response
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.sync.connection import Connection

from serve.errors import BadRequest, Overloaded

log = logging.getLogger(__name__)

ROUTE = "/invocations-bidirectional-stream"
PING_SECONDS = 20.0  # our own keepalive pings: a client that vanished is found within two of them
CLOSE_SECONDS = 5.0  # for the closing handshake

Send = Callable[[object], None]  # one message out: a JSON payload, or a string as it is


class UpgradedResponse(Response):
    """What the route returns once its WebSocket has ended: gunicorn's thread closes the connection (a
    StopIteration out of the WSGI call) and writes no HTTP response on it."""

    def __call__(self, environ, start_response):
        raise StopIteration("the connection was a WebSocket, now closed")


class Connections:
    """The WebSocket connections a worker holds at once, each with a thread of its own: at most `limit`
    (serve/config.py adds them to the threads, so /ping's stay free)."""

    def __init__(self, limit: int):
        self.limit, self.open = limit, 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.open >= self.limit:
                raise Overloaded(f"this worker holds its maximum of {self.limit} bidirectional streams "
                                 "(MAX_BIDIRECTIONAL_STREAMS): try again later")
            self.open += 1

    def give_back(self) -> None:
        with self._lock:
            self.open -= 1


def serve(environ: dict, max_message_bytes: int, answer: Callable[[str | bytes, Send], None],
          client_left: Callable[[], None]) -> Response:
    """Accept the upgrade request in `environ` and answer each message with `answer(message, send)` until the
    client closes; `client_left` is called when it closed during an answer. A request that is not a WebSocket
    upgrade is a 400 that says what it lacks."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        raise BadRequest(f"{ROUTE} takes a WebSocket (served under gunicorn)")
    protocol = ServerProtocol(max_size=max_message_bytes)
    protocol.receive_data(_request_bytes(environ))  # the request gunicorn has read, given to the protocol whole
    requests = [event for event in protocol.events_received() if isinstance(event, Request)]
    handshake = protocol.accept(requests[0]) if requests else None
    if handshake is None or handshake.status_code != 101:
        why = handshake.body.decode(errors="replace").strip() if handshake else "not an HTTP/1.1 GET"
        raise BadRequest(f"{ROUTE} takes a WebSocket upgrade: {why}")
    protocol.send_response(handshake)
    own_sock = sock.dup()  # the connection's to close; gunicorn closes its own after
    for data in protocol.data_to_send():
        own_sock.sendall(data)
    websocket = Connection(own_sock, protocol, ping_interval=PING_SECONDS, ping_timeout=PING_SECONDS,
                           close_timeout=CLOSE_SECONDS)
    websocket.start_keepalive()
    try:
        for message in websocket:
            try:
                answer(message, _sender(websocket, binary=isinstance(message, bytes)))
            except ConnectionClosed:  # the client left mid-answer: `answer` has given its generation up
                log.info("a bidirectional stream's client left during an answer: generation aborted")
                client_left()
                break
    except ConnectionClosed:  # closed between answers without a closing handshake
        pass
    finally:
        websocket.close()
    return UpgradedResponse()


def _sender(websocket: Connection, binary: bool) -> Send:
    """Answers go out as the message came in: binary for binary, text for text."""

    def send(payload: object) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        websocket.send(text.encode() if binary else text)

    return send


def _path(environ: dict) -> str:
    query = environ.get("QUERY_STRING", "")
    return environ.get("PATH_INFO", "/") + (f"?{query}" if query else "")


def _request_bytes(environ: dict) -> bytes:
    """The upgrade request's head again, from the WSGI environ (gunicorn joins repeated headers with commas)."""
    method = environ.get("REQUEST_METHOD", "GET")
    headers = [f"{key[5:].replace('_', '-').title()}: {value}" for key, value in environ.items()
               if key.startswith("HTTP_")]
    return "\r\n".join([f"{method} {_path(environ)} HTTP/1.1", *headers, "", ""]).encode("latin-1")
