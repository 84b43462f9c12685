"""A request's bytes as they arrive on a connection, read by serve/worker.py's main loop: where its head ends,
how long its body is (Content-Length, or chunked to its last chunk), and whether all of it is here; and the
answers the worker gives itself (Refused) to what it will not hand to a thread."""

from __future__ import annotations

import json

PING_LINES = (b"GET /ping HTTP/1.1", b"GET /ping HTTP/1.0")


class Refused(Exception):
    """A request the worker answers itself, before any thread or the app sees it."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    def response(self) -> bytes:
        """The answer, as the app's errors look: {"error", "error_type"}, then the connection closes."""
        body = json.dumps({"error": self.message, "error_type": self.reason.lower().replace(" ", "_")}).encode()
        head = (f"HTTP/1.1 {self.status} {self.reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        return head.encode() + body


class IncomingRequest:
    """One HTTP/1.1 request's bytes as they arrive, and whether they are all here (`ready`): all that gunicorn's
    parser will read of this request, so that a thread parsing it never waits on the socket.

    Where the bytes are framed in a way gunicorn's parser refuses from the head alone (Transfer-Encoding not
    ending in chunked, or with a Content-Length; several or non-numeric Content-Lengths; a bad chunk-size
    line), the request is ready at that point, and gunicorn answers 400 as it always did. Bytes past the end
    (a pipelined next request) stay in `data`: the parser keeps them for the next request."""

    def __init__(self, max_head_bytes: int, max_body_bytes: int):
        self.max_head_bytes = max_head_bytes
        self.max_body_bytes = max_body_bytes
        self.data = bytearray()
        self.head_end = -1  # just past the blank line that ends the head, once it has arrived
        self.end = -1  # just past the last byte the parser will read, once known
        self.next_chunk = -1  # a chunked body: where the next chunk-size line starts
        self.chunked_bytes = 0  # a chunked body: its bytes in the chunks complete so far
        self.expects_continue = False  # Expect: 100-continue on HTTP/1.1: the client may wait for it to send the body
        self.request_line = b""  # once the head has arrived
        self.connection = b""  # the Connection header's tokens, lower case

    @property
    def ready(self) -> bool:
        return 0 <= self.end <= len(self.data)

    def add(self, data: bytes) -> None:
        """Append what arrived. Raises Refused for a head, a chunk-size line or trailers over the head cap, or a
        body over the body cap."""
        searched = len(self.data)
        self.data += data
        if self.head_end < 0:
            self._find_head(max(0, searched - 3))
        if self.next_chunk >= 0 and self.end < 0:
            self._find_chunked_end()

    def _find_head(self, start: int) -> None:
        blank = self.data.find(b"\r\n\r\n", start, self.max_head_bytes)
        if blank < 0:
            if len(self.data) >= self.max_head_bytes:
                raise Refused(431, "Request Header Fields Too Large",
                              f"the request line and headers exceed {self.max_head_bytes} bytes")
            return
        self.head_end = blank + 4
        lines = bytes(self.data[:blank]).split(b"\r\n")
        request_line = lines[1] if lines[0] == b"" and len(lines) > 1 else lines[0]  # one empty line may lead
        fields: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields.setdefault(name.lower(), []).append(value.strip(b" \t"))
        self.request_line = request_line
        self.connection = b",".join(fields.get(b"connection", [])).lower()
        self.expects_continue = (request_line.endswith(b"HTTP/1.1")
                                 and [v.lower() for v in fields.get(b"expect", [])] == [b"100-continue"])
        lengths = fields.get(b"content-length", [])
        codings = b",".join(fields.get(b"transfer-encoding", []))
        if codings:
            if not lengths and codings.rsplit(b",", 1)[-1].strip(b" \t").lower() == b"chunked":
                self.next_chunk = self.head_end
            else:
                self.end = self.head_end  # refused by gunicorn from the head
        elif len(lengths) == 1 and lengths[0].isdigit():
            self._check_body_size(int(lengths[0]))
            self.end = self.head_end + int(lengths[0])
        else:
            self.end = self.head_end  # no body; or several or bad lengths, refused by gunicorn from the head

    def ping_keeps_alive(self) -> bool | None:
        """For a whole `GET /ping` without a body over HTTP/1.x: whether the connection stays open after the
        answer (HTTP/1.1 unless `Connection: close`; HTTP/1.0 with `Connection: keep-alive`). Else None."""
        if self.end != self.head_end or self.request_line not in PING_LINES:
            return None
        tokens = {token.strip() for token in self.connection.split(b",")}
        return b"close" not in tokens if self.request_line.endswith(b"1.1") else b"keep-alive" in tokens

    def _find_chunked_end(self) -> None:
        while True:
            line_end = self.data.find(b"\r\n", self.next_chunk)
            if line_end < 0:
                if len(self.data) - self.next_chunk > self.max_head_bytes:
                    raise Refused(400, "Bad Request", "a chunk-size line has no end")
                return
            size_field = bytes(self.data[self.next_chunk:line_end]).split(b";", 1)[0]
            try:
                size = int(size_field, 16)  # accepts all gunicorn accepts, and more (which gunicorn then refuses)
            except ValueError:
                size = -1
            start = line_end + 2
            if size < 0:
                self.end = start  # refused by gunicorn at this line
                return
            if size == 0:
                self._find_trailers_end(start)
                return
            self._check_body_size(self.chunked_bytes + size)
            if len(self.data) < start + size + 2:
                return
            if self.data[start + size:start + size + 2] != b"\r\n":
                self.end = start + size + 2  # refused by gunicorn: the chunk does not end where it said
                return
            self.chunked_bytes += size
            self.next_chunk = start + size + 2

    def _check_body_size(self, size: int) -> None:
        if size > self.max_body_bytes:
            raise Refused(413, "Request Entity Too Large", f"the request body exceeds {self.max_body_bytes} bytes")

    def _find_trailers_end(self, start: int) -> None:
        if self.data.startswith(b"\r\n", start):
            self.end = start + 2
            return
        blank = self.data.find(b"\r\n\r\n", start)
        if blank >= 0:
            self.end = blank + 4
        elif len(self.data) - start > self.max_head_bytes:
            raise Refused(431, "Request Header Fields Too Large",
                          f"the chunked body's trailers exceed {self.max_head_bytes} bytes")
