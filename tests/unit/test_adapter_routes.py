"""POST, GET and DELETE /adapters (serve/app.py) through Flask's test client, against tests/unit/test_app.py's
in-memory engine: AWS's registration fields, the alias header, the listing, and no fallback to the base
model for an adapter that is not there."""

from __future__ import annotations

import json

import pytest

from serve.adapters import Adapters
from serve.app import create_app
from tests.unit.test_app import MemoryEngine, post, startup

ALIAS = {"X-Amzn-SageMaker-Adapter-Alias": "Alice's twin"}


@pytest.fixture
def engine():
    return MemoryEngine()


@pytest.fixture
def adapters(tmp_path):
    (tmp_path / "registry").mkdir()
    return Adapters({"dana": "/adapters/dana"}, tmp_path / "registry", max_rank=64, source_root=tmp_path)


@pytest.fixture
def client(engine, adapters, tmp_path):
    return create_app(engine, adapters, startup(tmp_path)).test_client()


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "alice"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return str(folder)


def test_preload_and_pin_reach_the_engine_and_the_listing_shows_them(client, engine, folder):
    registered = post(client, {"name": "alice", "src": folder, "pin": True}, "/adapters", headers=ALIAS)
    assert registered.status_code == 200, registered.json
    assert registered.json == {"name": "alice", "src": folder, "pin": True, "preload": True,
                               "message": "Adapter Alice's twin registered"}  # AWS's answer, named by the alias
    assert post(client, {"name": "bob", "src": folder, "preload": False}, "/adapters").status_code == 200
    listing = client.get("/adapters").json["adapters"]
    assert [(r["name"], r["pin"], r["preload"], r["loaded"], r["pinned"], r["alias"]) for r in listing] == [
        ("alice", True, True, True, True, "Alice's twin"), ("bob", False, False, True, False, None)]
    own = client.get("/adapters", headers={"X-Amzn-SageMaker-Adapter-Identifier": "bob"}).json["adapters"]
    assert [r["name"] for r in own] == ["bob"]  # a caller SageMaker bound to one adapter sees that one alone
    paged = client.get("/adapters?limit=1").json
    assert [r["name"] for r in paged["adapters"]] == ["alice"] and paged["next_page_token"] == "1"
    gone = client.delete("/adapters/alice", headers=ALIAS)
    assert gone.status_code == 200 and gone.json["message"] == "Adapter Alice's twin unregistered"
    assert engine.loaded == ["bob"]


@pytest.mark.parametrize("body, field", [
    ({"name": "alice", "pin": "yes"}, "'pin'"),
    ({"name": "alice", "preload": None}, "'preload'"),
    ({"name": 3}, "needs name"),
])
def test_a_registration_field_of_the_wrong_type_is_a_400_naming_it(client, engine, folder, body, field):
    refused = post(client, {"src": folder, **body}, "/adapters")
    assert refused.status_code == 400 and field in refused.json["error"], refused.json
    assert engine.loaded == [] and client.get("/adapters").json == {"adapters": []}


def test_an_adapter_that_is_not_there_is_a_422_on_every_route_never_the_base_model(client, engine, adapters,
                                                                                   folder):
    """Registered, then unregistered before the request: by adapter_id, OpenAI's model or SageMaker's header,
    the request fails where serve/engine.py's submit looks its adapter up, and nothing is generated."""
    submit = engine.submit
    engine.submit = lambda request, wait=0.0: adapters.for_request(request) and submit(request, wait)
    assert post(client, {"name": "alice", "src": folder}, "/adapters").status_code == 200
    assert client.delete("/adapters/alice").status_code == 200
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for route, body, headers, error in (
            ("/invocations", {"inputs": "hi", "parameters": {"adapter_id": "alice"}}, {}, "unknown adapter 'alice'"),
            ("/v1/chat/completions", {**chat, "model": "alice"}, {}, "unknown model 'alice'"),
            ("/generate_stream", {"inputs": "hi"}, {"X-Amzn-SageMaker-Adapter-Identifier": "alice"},
             "unknown adapter 'alice'")):
        refused = post(client, body, route, headers=headers)
        assert refused.status_code == 422 and refused.json["error"].startswith(error), (route, refused.json)
        assert "dana" not in refused.json["error"]
    assert engine.admitted == 0
