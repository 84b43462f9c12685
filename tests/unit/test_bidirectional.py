"""The bidirectional-streaming route's edges without a socket: what is not a WebSocket upgrade, and the bound on
connections. Real WebSocket clients against real gunicorn + vLLM: tests/contract/test_conversations.py."""

from __future__ import annotations

import pytest

from serve.adapters import Adapters
from serve.app import create_app
from serve.bidirectional import ROUTE, Connections
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
