"""gunicorn's gthread worker, with each request read whole by the main loop before a thread takes it.

Why (issue #21): the stock gthread worker gives a connection to a pool thread as soon as its first byte is
readable, and that thread reads the rest of the head and the body on a blocking socket, with no time limit.
A few hundred clients that send one byte, or half a header block, and wait hold every thread, and /ping,
SageMaker's health check, queues behind them until SageMaker replaces the instance.

Here the main loop reads each request without blocking into a buffer: the head (request line and headers,
up to MAX_HEAD_BYTES), then the body, by its Content-Length or up to the last chunk of a chunked body (and
its trailers), all within REQUEST_DEADLINE_SECONDS. Only then does a thread take the connection, and its
parser reads the request from that buffer, never from the socket. A stalled client costs a buffer and a
file descriptor, never a thread, so the threads kept for /ping (serve/config.py's PING_THREADS) stay free.
A request still arriving at its deadline is answered 408, a head over the cap 431, a body over the app's cap
(Flask's MAX_CONTENT_LENGTH) 413, from its Content-Length or as soon as a chunked body passes it, and the
connection is closed: none of them takes a thread.

`GET /ping` (SageMaker's health check, several a second) is answered by the main loop itself when the app
gives an answer for it (`app.extensions["ping_answer"]`, serve/app.py's): no thread, no WSGI call, and no
wait behind requests that hold every thread. Anything else about a ping request (a body, a query, another
version than HTTP/1.x) goes to a thread as before.

The rest is gthread's: accepting up to worker_connections, keep-alive (an idle kept-alive connection waits
in the poller as before, and its next request is buffered like the first), graceful stop, the heartbeat,
max_requests. Two changes: a connection that closes after its answer lingers in the poller (gthread's
close_graceful blocks the main loop for up to 2 s on a client that does not close), and a stopping worker
waits STOP_LINGER_SECONDS at most for requests still arriving. TLS, HTTP/2, the PROXY protocol and uwsgi
are refused at start: their handshakes would be read by the thread, from the socket, before any request
(SageMaker speaks plain HTTP/1.1 to the container).
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections import deque
from functools import partial

from gunicorn.errors import ConfigError
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

from serve.incoming import IncomingRequest, Refused
from serve.readiness import ReadyBoard

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; gunicorn's own limits (a 4094-byte line, 8190-byte fields)
REQUEST_DEADLINE_SECONDS = 30.0  # for a whole request: from the connection's opening, or its next first byte
STOP_LINGER_SECONDS = 5.0  # a stopping worker still waits this long for requests that are arriving
CLOSE_LINGER_SECONDS = 2.0  # after the last answer, what the client still sends is read and dropped this long
CLOSE_DRAIN_BYTES = 64 * 1024  # ... and up to this much (as gunicorn's close_graceful)
DEFAULT_MAX_BODY_BYTES = 6 * 2**20  # when the app sets no MAX_CONTENT_LENGTH: InvokeEndpoint's payload limit
# A worker loading while another is ready takes no connection (serve/readiness.py), for at most this long: a
# load that hangs (a stuck GPU) then answers 503 again, and /ping shows it.
MAX_HIDDEN_LOAD_SECONDS = 900
# All requests still arriving hold at most this much at once: the larger of a floor and this many whole bodies
# (each may be up to the body cap, and up to worker_connections of them arrive at once: 6 GB unbounded).
MIN_BUFFER_BYTES = 256 * 2**20
BUFFER_BODIES = 8
RECV_BYTES = 256 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
REASONS = {200: "OK", 500: "Internal Server Error", 503: "Service Unavailable"}


class Connection(TConn):
    """gthread's connection, with the request arriving on it (None while a thread has the connection)."""

    def __init__(self, cfg, sock, client, server):
        super().__init__(cfg, sock, client, server)
        self.incoming: IncomingRequest | None = None
        self.drained = 0  # bytes dropped while closing


class BufferingWorker(ThreadWorker):
    """gthread, with requests read whole by the main loop (see the module's docstring)."""

    request_deadline = REQUEST_DEADLINE_SECONDS  # class attributes: the tests shorten them
    stop_linger = STOP_LINGER_SECONDS
    max_head_bytes = MAX_HEAD_BYTES
    min_buffer_bytes, buffer_bodies = MIN_BUFFER_BYTES, BUFFER_BODIES
    ready_board: ReadyBoard | None = None  # set in the master before the workers fork (serve/server.py)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arriving: deque[Connection] = deque()  # requests being buffered, oldest deadline first
        self.closing: deque[Connection] = deque()  # answered for the last time, half-closed, oldest first
        self.max_body_bytes = DEFAULT_MAX_BODY_BYTES
        self.buffered = 0  # bytes held by the requests still arriving
        self.stop_deadline: float | None = None
        self.ping_answer = None  # () -> (status, JSON body or b""): the app's /ping, answered on this loop
        self.marked_ready = False
        self.started = time.monotonic()

    @classmethod
    def check_config(cls, cfg, log) -> None:
        super().check_config(cfg, log)
        unsupported = [name for name, used in (("TLS (certfile, keyfile)", cfg.is_ssl),
                                               ("HTTP/2 (http_protocols)", "h2" in cfg.http_protocols),
                                               ("the PROXY protocol (proxy_protocol)", cfg.proxy_protocol != "off"),
                                               ("uwsgi (protocol)", cfg.protocol != "http")) if used]
        if unsupported:
            raise ConfigError(f"{cls.__name__} serves plain HTTP/1.1 only; not {', '.join(unsupported)}")

    def handle_exit(self, sig, frame) -> None:
        """SIGTERM (SageMaker scaling in, or replacing the instance): gthread stops accepting and waits up to
        the graceful timeout for its connections; the app is told, so that what would outlast that ends with
        an answer saying so (serve/app.py's `stopping`)."""
        first = self.alive
        super().handle_exit(sig, frame)
        if first:  # on the main loop, not in this signal handler (it starts a thread)
            self.method_queue.defer(self.stopping)

    def stopping(self) -> None:
        if self.ready_board is not None and self.marked_ready:  # no longer takes connections: not ready to others
            self.ready_board.mark(self.pid, False)
            self.marked_ready = False
        stopping = getattr(getattr(self, "wsgi", None), "extensions", {}).get("stopping")
        if stopping is not None:
            stopping(self.cfg.graceful_timeout)

    def notify(self) -> None:
        """Each turn of the loop: the heartbeat, and this worker's place on the ready board. Loading while
        another worker is ready, it takes no connection (serve/readiness.py)."""
        super().notify()
        if self.ready_board is None or not self.alive:
            return
        engine = getattr(getattr(self, "wsgi", None), "extensions", {}).get("engine")
        ready = engine is not None and engine.state == "ready"
        if ready != self.marked_ready:
            self.ready_board.mark(self.pid, ready)
            self.marked_ready = ready
        wanted = self.takes_connections()
        if wanted != self._accepting and (not wanted or self.nr_conns < self.worker_connections):
            ThreadWorker.set_accept_enabled(self, wanted)

    def takes_connections(self) -> bool:
        """Ready, or nobody else is, or loading so long that hiding it would hide a hang (its 503s then show)."""
        return (self.ready_board is None or self.marked_ready or not self.ready_board.others_ready(self.pid)
                or time.monotonic() - self.started > MAX_HIDDEN_LOAD_SECONDS)

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled and self.takes_connections())

    def load_wsgi(self) -> None:
        """The app's body cap (Flask's MAX_CONTENT_LENGTH) is where buffering a body stops."""
        super().load_wsgi()
        self.max_body_bytes = getattr(self.wsgi, "config", {}).get("MAX_CONTENT_LENGTH") or DEFAULT_MAX_BODY_BYTES
        self.ping_answer = getattr(self.wsgi, "extensions", {}).get("ping_answer")

    def accept(self, listener) -> None:
        """As gthread accepts, but the connection waits in the poller until its request is all here."""
        try:
            sock, client = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = Connection(self.cfg, sock, client, listener.getsockname())
        self.start_request(conn)
        self.on_request_bytes(conn, sock)  # a request usually arrives with its connection: read it without a turn

    def on_client_socket_readable(self, conn: Connection, client) -> None:
        """A kept-alive connection's next request begins: it is buffered like a new connection's. Or, most
        often, its client closed it: then it is closed at once."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        data = receive(conn)
        if data == b"":
            self.close_now(conn)
            return
        self.start_request(conn, data or b"")

    def start_request(self, conn: Connection, received: bytes = b"") -> None:
        conn.sock.setblocking(False)
        conn.incoming = IncomingRequest(self.max_head_bytes, self.max_body_bytes)
        conn.timeout = time.monotonic() + self.request_deadline
        self.arriving.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_request_bytes, conn))
        if received:
            self.add_bytes(conn, received)

    def on_request_bytes(self, conn: Connection, _client) -> None:
        data = receive(conn)
        if data is None:
            return
        if not data:  # closed (or reset) by the client before its request was all sent
            self.stop_arriving(conn)
            self.close_now(conn)
            return
        self.add_bytes(conn, data)

    def add_bytes(self, conn: Connection, data: bytes) -> None:
        request = conn.incoming
        had_head = request.head_end >= 0
        self.buffered += len(data)
        try:
            request.add(data)
        except Refused as refusal:
            self.stop_arriving(conn)
            self.refuse(conn, refusal)
            return
        budget = max(self.min_buffer_bytes, self.buffer_bodies * self.max_body_bytes)
        if request.head_end >= 0 and not request.ready and self.buffered > budget:  # (heads have their own cap)
            self.stop_arriving(conn)  # many large bodies arriving at once: this one is sent again later
            self.refuse(conn, Refused(503, "Service Unavailable", f"this worker is receiving {budget} bytes of "
                                      "request bodies at once, its most: send the request again"))
            return
        if request.ready:
            self.stop_arriving(conn)
            keep_alive = request.ping_keeps_alive() if self.ping_answer else None
            if keep_alive is None:
                self.hand_off(conn)
            else:
                self.answer_ping(conn, keep_alive and self.alive)
        elif request.expects_continue and not had_head and request.head_end >= 0:
            try:  # 25 bytes, non-blocking; gunicorn's thread sends another 100 later, which clients skip
                conn.sock.send(CONTINUE)
            except OSError:
                pass

    def hand_off(self, conn: Connection) -> None:
        """The request is all here: a thread parses it from the buffer (gthread's handle, unchanged)."""
        if conn.parser is None:
            conn.init()  # plain HTTP/1.1 only (check_config): makes the parser, reads nothing
        conn.parser.unreader.unread(bytes(conn.incoming.data))
        conn.incoming = None
        self.enqueue_req(conn)

    def answer_ping(self, conn: Connection, keep_alive: bool) -> None:
        """The app's answer to /ping, sent from this loop; then the connection waits for its next request (at once
        if the client pipelined it), or closes."""
        status, body = self.ping_answer()
        head = f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        head += "\r\n" if keep_alive else "Connection: close\r\n\r\n"
        answer = head.encode() + body
        try:  # non-blocking: a few hundred bytes, which the kernel takes whole unless the client stopped reading
            sent = conn.sock.send(answer)
        except OSError:
            sent = 0
        request, conn.incoming = conn.incoming, None
        if sent != len(answer):
            self.close_now(conn)
        elif not keep_alive:
            self.close_softly(conn)
        elif len(request.data) > request.end:
            self.start_request(conn, bytes(request.data[request.end:]))
        else:
            self.keep_alive(conn)

    def keep_alive(self, conn: Connection) -> None:
        """The connection waits in the poller for its next request, up to the keep-alive timeout."""
        conn.sock.setblocking(False)
        conn.set_timeout()
        if not self.alive:
            conn.timeout = min(conn.timeout, time.monotonic() + STOP_KEEPALIVE_LINGER)
        self.keepalived_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    def finish_request(self, conn: Connection, fs) -> None:
        """A thread is done with the connection: keep it alive (its next request is buffered like the first:
        at once if the client pipelined it) or close it without blocking this loop."""
        try:
            keep = not fs.cancelled() and fs.result() is True
        except Exception:  # handle() answers what it can; anything else leaves the connection unusable
            keep = False
        if not keep:
            self.close_softly(conn)
            return
        pipelined = conn.parser.unreader.take_buffered()
        if pipelined:
            self.start_request(conn, pipelined)
            return
        self.keep_alive(conn)

    def refuse(self, conn: Connection, refusal: Refused) -> None:
        try:  # a small answer, non-blocking: the kernel takes it whole unless the client stopped reading
            conn.sock.send(refusal.response())
        except OSError:
            pass
        self.close_softly(conn)

    def close_softly(self, conn: Connection) -> None:
        """Half-close, then drop what the client still sends until it closes, for CLOSE_LINGER_SECONDS at most:
        gunicorn's close_graceful (so the last answer is not cut by a reset), without blocking this loop."""
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close_now(conn)
            return
        conn.timeout = time.monotonic() + CLOSE_LINGER_SECONDS
        self.closing.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_closing_bytes, conn))

    def on_closing_bytes(self, conn: Connection, _client) -> None:
        data = receive(conn)
        if data is None:
            return
        conn.drained += len(data)
        if not data or conn.drained >= CLOSE_DRAIN_BYTES:
            self.closing.remove(conn)
            self.poller.unregister(conn.sock)
            self.close_now(conn)

    def murder_pending(self) -> None:
        """gthread calls this on every turn of its loop, running or stopping: requests still arriving at their
        deadline are answered 408 (a connection that sent nothing is just closed), and closing connections
        closed once they have lingered. A stopping worker gives arriving requests `stop_linger` seconds."""
        now = time.monotonic()
        if not self.alive and self.stop_deadline is None:
            self.stop_deadline = now + self.stop_linger
        stop_over = self.stop_deadline is not None and now >= self.stop_deadline
        while self.arriving and (stop_over or self.arriving[0].timeout <= now):
            conn = self.arriving[0]
            self.stop_arriving(conn)
            if conn.incoming.data:
                self.refuse(conn, Refused(408, "Request Timeout",
                                          f"the request did not arrive whole within {self.request_deadline:g} s"))
            else:
                self.close_now(conn)
        while self.closing and self.closing[0].timeout <= now:
            conn = self.closing.popleft()
            self.poller.unregister(conn.sock)
            self.close_now(conn)

    def stop_arriving(self, conn: Connection) -> None:
        self.buffered -= len(conn.incoming.data)
        self.arriving.remove(conn)
        self.poller.unregister(conn.sock)

    def close_now(self, conn: Connection) -> None:
        self.nr_conns -= 1
        conn.close()


def receive(conn) -> bytes | None:
    """What a readable connection has: None when nothing after all, b"" once closed or reset by the client."""
    try:
        return conn.sock.recv(RECV_BYTES)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
