"""serve/worker.py's buffering, byte by byte: when a request is all here (so a thread parsing it never waits on
the socket), and what the worker refuses itself. The worker in a real gunicorn: tests/contract/test_slow_clients.py."""

import pytest
from gunicorn.config import Config
from gunicorn.errors import ConfigError

from serve.incoming import IncomingRequest, Refused
from serve.worker import BufferingWorker

HEAD_CAP, BODY_CAP = 1024, 100


def arriving(*pieces: bytes) -> IncomingRequest:
    request = IncomingRequest(HEAD_CAP, BODY_CAP)
    for piece in pieces:
        request.add(piece)
    return request


def ready_after(data: bytes) -> int:
    """How many bytes, fed one at a time, until the request is ready (0: never)."""
    request = IncomingRequest(HEAD_CAP, BODY_CAP)
    for count in range(1, len(data) + 1):
        request.add(data[count - 1:count])
        if request.ready:
            return count
    return 0


def test_a_head_is_ready_only_with_its_blank_line():
    head = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
    assert ready_after(head) == len(head)
    assert not arriving(b"G").ready and not arriving(head[:-2]).ready
    assert ready_after(b"\r\n" + head) == len(head) + 2  # one empty line before the request line is allowed


def test_a_body_is_ready_by_its_content_length_and_a_pipelined_request_stays_in_the_buffer():
    request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    assert ready_after(request) == len(request)
    pipelined = arriving(request + b"GET /ping HTT")
    assert pipelined.ready and pipelined.end == len(request) and bytes(pipelined.data).endswith(b"GET /ping HTT")


def test_a_chunked_body_is_ready_after_its_last_chunk_and_trailers():
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    assert ready_after(head + b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\n\r\n") == len(head) + 29
    with_trailers = head + b"5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"
    assert ready_after(with_trailers) == len(with_trailers)
    assert not arriving(head + b"5\r\nhello\r\n0\r\n").ready


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
])
def test_framing_gunicorn_refuses_from_the_head_is_handed_over_at_the_head(head):
    assert ready_after(head + b"hello") == len(head)


@pytest.mark.parametrize("bad_chunk", [b"zz\r\n", b"5\r\nhelloXX"])
def test_a_bad_chunk_is_handed_over_where_gunicorn_refuses_it(bad_chunk):
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert ready_after(head + bad_chunk + b"more") == len(head) + len(bad_chunk)


def test_a_body_over_the_apps_cap_is_refused_413_from_its_length():
    with pytest.raises(Refused) as refused:
        arriving(b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n")
    assert refused.value.status == 413 and b'"error_type": "request_entity_too_large"' in refused.value.response()
    chunked = arriving(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n" + b"x" * 64 + b"\r\n")
    with pytest.raises(Refused, match="exceeds 100 bytes"):
        chunked.add(b"25\r\n")  # 64 + 37 bytes: refused from the chunk-size line, before its bytes arrive


def test_a_head_over_the_cap_is_refused_431():
    request = IncomingRequest(HEAD_CAP, BODY_CAP)
    request.add(b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * (HEAD_CAP - 30) + b"\r\n")
    with pytest.raises(Refused) as refused:
        request.add(b"X-More: 1\r\n\r\n")
    assert refused.value.status == 431
    assert refused.value.response().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b'"error_type": "request_header_fields_too_large"' in refused.value.response()


def test_expect_100_continue_is_noticed_on_http_1_1_only():
    expecting = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    assert arriving(expecting).expects_continue and not arriving(expecting).ready
    assert not arriving(expecting.replace(b"HTTP/1.1", b"HTTP/1.0")).expects_continue


@pytest.mark.parametrize("setting, value", [("certfile", "/tls/cert.pem"), ("http_protocols", "h2,h1"),
                                            ("proxy_protocol", "v1"), ("protocol", "uwsgi")])
def test_tls_http2_proxy_protocol_and_uwsgi_are_refused_at_start(setting, value):
    config = Config()
    BufferingWorker.check_config(config, None)
    config.set(setting, value)
    with pytest.raises(ConfigError, match="plain HTTP/1.1 only"):
        BufferingWorker.check_config(config, None)


@pytest.mark.parametrize("head, keeps_alive", [
    (b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n", True),
    (b"GET /ping HTTP/1.1\r\nConnection: Upgrade, Close\r\n\r\n", False),
    (b"GET /ping HTTP/1.0\r\n\r\n", False),
    (b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
    (b"GET /ping?x=1 HTTP/1.1\r\n\r\n", None),  # anything but the plain health check: the app's route answers
    (b"HEAD /ping HTTP/1.1\r\n\r\n", None),
    (b"GET /pingx HTTP/1.1\r\n\r\n", None),
    (b"GET /ping HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", None),
    (b"POST /ping HTTP/1.1\r\nContent-Length: 0\r\n\r\n", None),
])
def test_the_main_loop_answers_only_a_plain_get_ping(head, keeps_alive):
    assert arriving(head).ping_keeps_alive() is keeps_alive
