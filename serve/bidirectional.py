"""SageMaker's bidirectional streaming (InvokeEndpointWithBidirectionalStream): a WebSocket on the serving port.

SageMaker opens a WebSocket to `/invocations-bidirectional-stream` (the image says it can with the label
`com.amazonaws.sagemaker.capabilities.bidirectional-streaming=true`), sends each request event's bytes as one
message (a text frame for UTF8 events, binary otherwise), pings every 60 s, and turns each message the
container sends into a response event of the same type. The connection lasts many turns.

gunicorn's thread for the upgrade request keeps the connection for its whole life, and is its only thread: the
`websockets` library's sans-I/O protocol does the framing, the handshake, pongs and the closing handshake over
gunicorn's socket, and `answer` (the app's) turns each message into its answer's messages. When the client
closes, gunicorn is told to close the socket and write nothing: the route answers an `UpgradedResponse`.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections import Counter, deque
from typing import Callable

from flask import Response
from websockets.frames import CloseCode, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from serve.errors import BadRequest, ClientGone, Overloaded

log = logging.getLogger(__name__)

ROUTE = "/invocations-bidirectional-stream"
IDLE_SECONDS = 330.0  # a connection that sends nothing for this long is closed: SageMaker pings every 60 s
RECV_BYTES = 64 * 1024

Send = Callable[[object], None]  # one message out: a JSON payload, or a string as it is


class UpgradedResponse(Response):
    """What the route returns once its WebSocket has ended: gunicorn's thread closes the connection (a
    StopIteration out of the WSGI call) and writes no HTTP response on it."""

    def __call__(self, environ, start_response):
        raise StopIteration("the connection was a WebSocket, now closed")


class Connections:
    """The WebSocket connections a worker holds at once, each with a thread of its own: at most `limit`
    (serve/config.py adds them to the threads, so /ping's stay free), and at most `per_adapter` of one twin's
    (its adapter header's; 0: no such limit), so that on an endpoint of several people's twins one twin's
    callers, whose connections SageMaker keeps open with pings, cannot hold every thread."""

    def __init__(self, limit: int, per_adapter: int = 0):
        self.limit, self.per_adapter, self.open = limit, per_adapter, 0
        self._by_adapter: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._live: set[Connection] = set()
        self._going_away = False

    def take(self, adapter: str = "") -> None:
        """One connection for `adapter` (its header's value, "" for none); Overloaded past either limit."""
        with self._lock:
            if self.open >= self.limit:
                raise Overloaded(f"this worker holds its maximum of {self.limit} bidirectional streams "
                                 "(MAX_BIDIRECTIONAL_STREAMS): try again later")
            if self.per_adapter and self._by_adapter[adapter] >= self.per_adapter:
                raise Overloaded(f"this twin holds its maximum of {self.per_adapter} bidirectional streams on this "
                                 "worker (MAX_BIDIRECTIONAL_STREAMS_PER_ADAPTER): close one, or try again later")
            self.open += 1
            self._by_adapter[adapter] += 1

    def give_back(self, adapter: str = "") -> None:
        with self._lock:
            self.open -= 1
            self._by_adapter[adapter] -= 1
            if not self._by_adapter[adapter]:
                del self._by_adapter[adapter]

    def add(self, connection: "Connection") -> None:
        with self._lock:
            self._live.add(connection)
            going_away = self._going_away
        if going_away:
            connection.go_away()

    def remove(self, connection: "Connection") -> None:
        with self._lock:
            self._live.discard(connection)

    def going_away(self) -> None:
        """The worker stops: each connection ends with a going-away close (1001) once its current answer is
        sent, or now when it is waiting for a message; SageMaker's client opens a new one elsewhere."""
        with self._lock:
            self._going_away = True
            live = list(self._live)
        for connection in live:
            connection.go_away()


def serve(environ: dict, max_message_bytes: int, answer: Callable[[str | bytes, Send], None],
          client_left: Callable[[], None], connections: Connections | None = None) -> Response:
    """Accept the upgrade request in `environ` and answer each message with `answer(message, send)` until the
    client closes, or the worker stops (`connections.going_away`); `client_left` is called when the client
    closed during an answer. A request that is not a WebSocket upgrade is a 400 that says what it lacks."""
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
    connection = Connection(sock, protocol)
    if connections is not None:
        connections.add(connection)
    try:
        connection.flush()  # the 101
        while not connection.leaving and (message := connection.receive()) is not None:
            try:
                answer(message, connection.sender(binary=isinstance(message, bytes)))
            except ClientGone:  # the client left mid-answer: `answer` has given its generation up
                log.info("a bidirectional stream's client left during an answer: generation aborted")
                client_left()
                break
    except ClientGone:  # before its 101
        pass
    finally:
        if connections is not None:
            connections.remove(connection)
        connection.close()
    return UpgradedResponse()


class Connection:
    """The WebSocket on gunicorn's socket, driven by this one thread: `receive` reads until a whole message
    (answering pings and a close as they come), `sender` writes messages. While an answer is written nothing
    is read: a client that left shows as a write that fails (ClientGone), within a token or two."""

    def __init__(self, sock, protocol: ServerProtocol):
        self.sock, self.protocol = sock, protocol
        self.sock.settimeout(IDLE_SECONDS)
        self._frames: deque = deque()  # received, not yet taken
        self._parts: list[bytes] = []  # a fragmented message so far
        self._binary = False
        self.leaving = False  # the worker stops: no message is read after the current answer
        self._waiting = False  # in recv(), for the next message (not answering one)
        self._state = threading.Lock()

    def go_away(self) -> None:
        """From another thread: read no further message; one waiting for it stops waiting now. An answer being
        written goes on: its socket is left alone (shutting its reading side would look, to the hang-up watch,
        like the client leaving)."""
        with self._state:
            self.leaving = True
            waiting = self._waiting
        if waiting:
            try:
                self.sock.shutdown(socket.SHUT_RD)  # the recv() in progress returns at once
            except OSError:
                pass

    def receive(self) -> str | bytes | None:
        """The next whole message; None once the client closed, went quiet past IDLE_SECONDS, or broke the
        protocol (a too-large message: close code 1009). Frames read past that message wait their turn: a
        client may send its next messages before the answer to this one."""
        while True:
            self._frames.extend(self.protocol.events_received())
            while self._frames:
                frame = self._frames.popleft()
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    self._parts, self._binary = [frame.data], frame.opcode is Opcode.BINARY
                elif frame.opcode is Opcode.CONT:
                    self._parts.append(frame.data)
                else:
                    continue  # ping (answered by the protocol), pong, close
                if frame.fin:
                    data = b"".join(self._parts)
                    return data if self._binary else data.decode()  # the protocol checked the UTF-8
            if self.protocol.state is not State.OPEN:
                return None
            with self._state:
                if self.leaving:
                    return None
                self._waiting = True
            try:
                data = self.sock.recv(RECV_BYTES)
            except (TimeoutError, OSError):
                return None
            finally:
                with self._state:
                    self._waiting = False
            if self.leaving:
                return None
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            try:
                self.flush()  # pongs, a close's answer
            except ClientGone:
                return None

    def sender(self, binary: bool) -> Send:
        """Answers go out as the message came in: binary for binary, text for text."""

        def send(payload: object) -> None:
            text = payload if isinstance(payload, str) else json.dumps(payload)
            if self.protocol.state is not State.OPEN:
                raise ClientGone("the client closed the bidirectional stream")
            if binary:
                self.protocol.send_binary(text.encode())
            else:
                self.protocol.send_text(text.encode())
            self.flush()

        return send

    def flush(self) -> None:
        try:
            for data in self.protocol.data_to_send():
                if data:
                    self.sock.sendall(data)
                else:  # the closing handshake is done on our side
                    self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:  # reset, or gone
            raise ClientGone(f"the client left the bidirectional stream: {e}") from None

    def close(self) -> None:
        """A closing handshake when the client did not start one (gunicorn closes the socket after)."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(CloseCode.GOING_AWAY if self.leaving else CloseCode.NORMAL_CLOSURE)
            try:
                self.flush()
            except ClientGone:
                pass


def _path(environ: dict) -> str:
    query = environ.get("QUERY_STRING", "")
    return environ.get("PATH_INFO", "/") + (f"?{query}" if query else "")


def _request_bytes(environ: dict) -> bytes:
    """The upgrade request's head again, from the WSGI environ (gunicorn joins repeated headers with commas)."""
    method = environ.get("REQUEST_METHOD", "GET")
    headers = [f"{key[5:].replace('_', '-').title()}: {value}" for key, value in environ.items()
               if key.startswith("HTTP_")]
    return "\r\n".join([f"{method} {_path(environ)} HTTP/1.1", *headers, "", ""]).encode("latin-1")
