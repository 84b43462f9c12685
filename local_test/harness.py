"""What the tests and the benches share to drive the real `serve` and `train` processes: a free port, a
process's whole tree, and a server-sent-events body read event by event."""

from __future__ import annotations

import json
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    pids, todo = [pid], [pid]
    while todo:
        children = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True).stdout.split()
        pids += map(int, children)
        todo += map(int, children)
    return pids


def sse_events(text: str) -> list:
    """An SSE body's events: `data:` blocks separated by blank lines, each a JSON object, or OpenAI's last
    `[DONE]` as that string. Anything else in the body is an error."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        if not block.startswith("data:"):
            raise ValueError(f"not an SSE data event: {block[:200]!r}")
        payload = block[len("data:"):].strip()
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# A request cut short, as a client that stalls sends it: one byte, or half a header block.
ONE_BYTE, HALF_HEAD = b"P", b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: applica"


def still_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed nor reset a connection (nothing read from it is lost: the
    connections asked are half-sent ones, which get no answer)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)
