"""The bidirectional-streaming route's edges without a server: what is not a WebSocket upgrade, the bound on
connections, messages that arrive together. Real WebSocket clients against real gunicorn + vLLM:
tests/contract/test_conversations.py."""

from __future__ import annotations

import socket

import pytest
from websockets.client import ClientProtocol
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from serve.adapters import Adapters
from serve.app import create_app
from serve.bidirectional import ROUTE, Connection, Connections
from serve.errors import Overloaded
from tests.unit.test_app import MemoryEngine, startup

UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.fixture
def client(tmp_path):
    return create_app(MemoryEngine(), Adapters({}), startup(tmp_path)).test_client()


def test_a_plain_get_or_a_post_is_not_an_upgrade(client):
    assert client.get(ROUTE).status_code == 400
    assert client.post(ROUTE, json={"inputs": "hi"}).status_code in (400, 405)
    no_socket = client.get(ROUTE, headers=UPGRADE)  # Flask's test client has no socket to upgrade
    assert no_socket.status_code == 400 and no_socket.json["error_type"] == "bad_request"


def test_connections_are_bounded_per_worker():
    connections = Connections(limit=2)
    connections.take()
    connections.take()
    with pytest.raises(Overloaded, match="maximum of 2 bidirectional streams"):
        connections.take()
    connections.give_back()
    connections.take()


def test_one_twin_cannot_hold_every_connection_of_a_worker_others_share():
    connections = Connections(limit=4, per_adapter=2)
    connections.take("alice")
    connections.take("alice")
    with pytest.raises(Overloaded, match="this twin holds its maximum of 2 bidirectional streams") as refused:
        connections.take("alice")
    assert "alice" not in str(refused.value) and "bob" not in str(refused.value)
    connections.take("bob")  # another twin, and the base model, still connect
    connections.take("")
    with pytest.raises(Overloaded, match="maximum of 4 bidirectional streams"):
        connections.take("carol")  # the worker's own limit still holds
    connections.give_back("alice")
    connections.give_back("bob")
    connections.take("alice")  # a place of hers freed


def test_messages_that_arrive_in_one_read_are_each_answered_in_turn():
    """A client may send its next messages before the answer to the first: one read then holds several, and
    none may be lost (they were, before: each read gave only its first message)."""
    client, server = ClientProtocol(parse_uri("ws://127.0.0.1" + ROUTE)), ServerProtocol()
    client.send_request(client.connect())
    server.receive_data(b"".join(client.data_to_send()))
    server.send_response(server.accept(server.events_received()[0]))
    client.receive_data(b"".join(server.data_to_send()))
    for text in ("one", "two", "three"):
        client.send_text(text.encode())
    client.send_binary(b"four")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"".join(client.data_to_send()))  # one write: one read on our side
        connection = Connection(ours, server)
        ours.settimeout(5)  # a lost message shows as None after 5 s, not after the idle timeout's 330
        assert [connection.receive() for _ in range(4)] == ["one", "two", "three", b"four"]
        theirs.close()
        assert connection.receive() is None  # then the client is gone


def test_a_stopping_worker_closes_a_waiting_connection_with_going_away_at_once():
    """SIGTERM: a connection waiting for its next message (for up to 330 s) is closed now with 1001, so
    gunicorn's graceful stop does not wait for it and SageMaker's client reconnects elsewhere."""
    import threading

    from websockets.frames import Close, CloseCode, Opcode

    client, server = ClientProtocol(parse_uri("ws://127.0.0.1" + ROUTE)), ServerProtocol()
    client.send_request(client.connect())
    server.receive_data(b"".join(client.data_to_send()))
    server.send_response(server.accept(server.events_received()[0]))
    client.receive_data(b"".join(server.data_to_send()))
    connections = Connections(limit=2)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        connection = Connection(ours, server)
        connections.add(connection)
        received = []
        waiting = threading.Thread(target=lambda: received.append(connection.receive()))
        waiting.start()
        connections.going_away()
        waiting.join(timeout=30)
        assert not waiting.is_alive() and received == [None]
        connection.close()
        theirs.settimeout(30)
        client.receive_data(theirs.recv(1024))
        closes = [event for event in client.events_received() if getattr(event, "opcode", None) is Opcode.CLOSE]
        assert [Close.parse(close.data).code for close in closes] == [CloseCode.GOING_AWAY]
    first, second = socket.socketpair()
    with first, second:
        late = Connection(first, ServerProtocol())
        connections.add(late)  # opened while the worker goes away: it leaves at once
        assert late.leaving
