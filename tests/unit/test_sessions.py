"""Stateful sessions (serve/sessions.py): the store the workers share, and the HTTP contract through Flask's
test client against tests/unit/test_app.py's in-memory engine. Real gunicorn + vLLM: test_conversations.py."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from dataclasses import replace

import pytest

from serve.adapters import Adapters
from serve.app import create_app
from serve.errors import BadRequest, Conflict, Overloaded, ValidationError
from serve.schemas import ADAPTER_HEADER, GenerateParams, GenerateRequest
from serve.sessions import CLOSED_SESSION_HEADER, NEW_SESSION_HEADER, SESSION_HEADER, Sessions
from tests.unit.test_app import JSONLINES, MemoryEngine, post, startup, test_client, wait_until


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def sessions(tmp_path, clock):
    return Sessions(tmp_path, ttl=60, max_sessions=3, max_bytes=2000, clock=clock)


def ask(text: str, adapter: str | None = None) -> GenerateRequest:
    return GenerateRequest(text, GenerateParams(adapter_id=adapter))


def test_a_turn_sees_the_conversation_so_far_and_records_its_answer(sessions):
    session = sessions.open("")
    turn = sessions.turn(session.id, ask("Hello"), "")
    assert turn.request.conversation == [{"role": "user", "content": "Hello"}]
    turn.answered("Hi there")
    turn = sessions.turn(session.id, ask("And you?"), "")
    assert turn.request.conversation == [{"role": "user", "content": "Hello"},
                                         {"role": "assistant", "content": "Hi there"},
                                         {"role": "user", "content": "And you?"}]
    turn.release()  # given up: nothing recorded
    assert sessions.find(session.id, "").messages == ({"role": "user", "content": "Hello"},
                                                      {"role": "assistant", "content": "Hi there"})


def test_a_sessions_turns_share_a_cache_salt_no_other_session_or_stateless_request_has(sessions):
    first, second = sessions.open(""), sessions.open("")
    salts = []
    for session in (first, first, second):
        turn = sessions.turn(session.id, ask("Hello"), "")
        salts.append(turn.request.cache_salt)
        turn.answered("Hi")
    assert salts[0] == salts[1] and salts[0] != salts[2]  # one session's turns share cached prefixes, only theirs
    assert first.id not in salts[0] and len(salts[0]) == 64  # a hash: the id itself reaches no engine structure
    assert ask("Hello").cache_salt is None  # a request outside a session is not salted
    salted = sessions.turn(first.id, replace(ask("Hello"), cache_salt="client's"), "")
    assert salted.request.cache_salt not in (salts[0], "client's")  # the client's salt narrows it further
    salted.release()


def test_one_turn_at_a_time_and_a_second_store_sees_the_same_sessions(sessions, tmp_path, clock):
    session = sessions.open("")
    running = sessions.turn(session.id, ask("Hello"), "")
    other_worker = Sessions(tmp_path, ttl=60, max_sessions=3, max_bytes=2000, clock=clock)
    with pytest.raises(Conflict, match="another turn of this session is still running"):
        other_worker.turn(session.id, ask("Hello again"), "")
    running.answered("Hi")
    other_worker.turn(session.id, ask("Hello again"), "").answered("Hi again")
    assert len(sessions.find(session.id, "").messages) == 4


def test_sessions_expire_are_bounded_and_are_each_adapters_own(sessions, clock):
    alice = sessions.open("alice")
    with pytest.raises(BadRequest) as other:
        sessions.turn(alice.id, ask("Hi", adapter="bob"), "bob")
    with pytest.raises(BadRequest) as unknown:
        sessions.turn("00000000-0000-4000-8000-000000000000", ask("Hi", adapter="bob"), "bob")
    assert str(other.value).replace(alice.id, "ID") == str(unknown.value).replace(
        "00000000-0000-4000-8000-000000000000", "ID")  # another adapter's session is as unknown as none
    with pytest.raises(BadRequest, match="not a session id this endpoint gave"):
        sessions.find("../" + alice.id[3:], "alice")
    sessions.open("")
    sessions.open("")
    with pytest.raises(Overloaded, match="maximum of 3 open sessions"):
        sessions.open("")
    clock.now += 61
    with pytest.raises(BadRequest, match="expired at"):
        sessions.turn(alice.id, ask("Hi", adapter="alice"), "alice")
    sessions.open("")  # the expired ones were swept: room again
    assert len(list(sessions.folder.glob("*.json"))) == 1


def test_a_conversation_is_bounded_in_size_and_a_turn_is_one_chat_answer(sessions):
    session = sessions.open("")
    with pytest.raises(ValidationError, match="would be .* bytes, over this endpoint's 2000"):
        sessions.turn(session.id, ask("word " * 500), "")
    several = GenerateRequest("Hi", GenerateParams(best_of=2))
    with pytest.raises(ValidationError, match="one answer"):
        sessions.turn(session.id, several, "")
    with pytest.raises(ValidationError, match="not a completion"):
        sessions.turn(session.id, GenerateRequest("Hi", GenerateParams(), completion=True), "")
    sessions.turn(session.id, ask("Hi"), "").answered("Hello")  # the lock was not kept by the refusals


def test_the_maximum_holds_when_workers_open_sessions_at_once(tmp_path, clock):
    workers = [Sessions(tmp_path, ttl=60, max_sessions=5, max_bytes=2000, clock=clock) for _ in range(8)]
    start, outcomes = threading.Barrier(8), []

    def open_one(store):
        start.wait()
        try:
            outcomes.append(store.open("").id)
        except Overloaded:
            outcomes.append("refused")

    threads = [threading.Thread(target=open_one, args=(store,)) for store in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert outcomes.count("refused") == 3 and len(list(tmp_path.glob("*.json"))) == 5


def test_a_full_folder_refuses_the_turn_and_leaves_the_session_as_it_was(sessions, monkeypatch):
    session = sessions.open("")
    sessions.turn(session.id, ask("Hello"), "").answered("Hi")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("serve.sessions.json.dump", no_space)
    turn = sessions.turn(session.id, ask("And you?"), "")
    with pytest.raises(Overloaded, match=r"cannot store its sessions now \(No space left on device\)"):
        turn.answered("Fine")
    with pytest.raises(Overloaded, match="No space left on device"):
        sessions.open("")
    monkeypatch.setattr("serve.sessions.os.utime", no_space)  # the lock file's time, before the conversation
    with pytest.raises(Overloaded, match="No space left on device"):
        sessions.open("")
    assert sorted(p.name for p in sessions.folder.iterdir() if p.name != ".sessions-lock") == [
        f"{session.id}.json", f"{session.id}.lock"]  # no staging file, no half-opened session
    monkeypatch.undo()
    assert "past that a turn or an opening gets 429" in Sessions.room_warning(sessions.folder, 10, 2**60)
    assert Sessions.room_warning(sessions.folder, 3, 2000) is None
    assert [m["content"] for m in sessions.find(session.id, "").messages] == ["Hello", "Hi"]
    sessions.turn(session.id, ask("And you?"), "").answered("Fine")  # the refused turn let its lock go


def test_a_closed_session_stays_closed_and_the_sweep_reads_no_conversation(sessions, clock):
    running_session, other = sessions.open(""), sessions.open("")
    running = sessions.turn(running_session.id, ask("Hello"), "")
    sessions.close(running_session.id, "")
    running.answered("Hi")  # its session was closed meanwhile: not brought back
    with pytest.raises(BadRequest, match="session not found"):
        sessions.find(running_session.id, "")
    sessions.path(other.id).write_text("{not json")  # the count comes from the lock files' times
    left = sessions.folder / ".dead-worker.tmp"
    left.write_text("half")
    os.utime(left, (time.time() - 3600, time.time() - 3600))
    sessions.open(""), sessions.open("")  # with `other`, three: the closed one is not counted
    with pytest.raises(Overloaded, match="maximum of 3"):
        sessions.open("")
    assert not left.exists()  # a staging file nobody renamed for an hour was swept
    clock.now += 61
    sessions.open("")  # the two expired, the corrupt one too
    assert len(list(sessions.folder.glob("*.lock"))) == 1


@pytest.fixture
def engine():
    return MemoryEngine()


@pytest.fixture
def client(engine, tmp_path):
    (tmp_path / "sessions").mkdir()
    start = replace(startup(tmp_path, SAGEMAKER_ENABLE_STATEFUL_SESSIONS="true"), session_folder=tmp_path / "sessions")
    return test_client(engine, tmp_path, start)


def new_session(client, **headers) -> str:
    opened = post(client, {"requestType": "NEW_SESSION"}, headers=headers)
    assert opened.status_code == 200
    session_id, expires = opened.headers[NEW_SESSION_HEADER].split("; Expires=")
    assert opened.json == {"session_id": session_id, "expires": expires}
    return session_id


def test_the_http_contract(client, engine):
    session_id = new_session(client)
    first = post(client, {"inputs": "hello there"}, headers={SESSION_HEADER: session_id})
    assert first.status_code == 200 and first.json == [{"generated_text": " HELLO THERE"}]
    chat = {"messages": [{"role": "user", "content": "more words"}], "stream": True}
    streamed = post(client, chat, headers={SESSION_HEADER: session_id})
    assert streamed.status_code == 200 and streamed.get_data(as_text=True).endswith("data: [DONE]\n\n")
    closed = post(client, {"requestType": "CLOSE"}, headers={SESSION_HEADER: session_id})
    assert closed.status_code == 200 and closed.headers[CLOSED_SESSION_HEADER] == session_id
    assert closed.json == {"session_id": session_id, "closed": True}
    again = post(client, {"requestType": "CLOSE"}, headers={SESSION_HEADER: session_id})
    assert again.status_code == 400 and again.json["error"].startswith("session not found")


def test_a_session_is_bound_to_its_adapter_and_a_body_cannot_move_it(client):
    session_id = new_session(client, **{ADAPTER_HEADER: "dana"})
    elsewhere = post(client, {"inputs": "hi"}, headers={SESSION_HEADER: session_id})  # no adapter header
    assert elsewhere.status_code == 400 and "session not found" in elsewhere.json["error"]
    assert "dana" not in elsewhere.json["error"]
    by_body = post(client, {"inputs": "hi", "parameters": {"adapter_id": "eve"}},
                   headers={SESSION_HEADER: session_id, ADAPTER_HEADER: "dana"})
    assert by_body.status_code == 403
    own = post(client, {"inputs": "hi"}, headers={SESSION_HEADER: session_id, ADAPTER_HEADER: "dana"})
    assert own.status_code == 200
    base_session = new_session(client)  # without the header, OpenAI's model names the adapter: not this session's
    moved = post(client, {"messages": [{"role": "user", "content": "hi"}], "model": "dana"},
                 headers={SESSION_HEADER: base_session})
    assert moved.status_code == 400 and "session not found" in moved.json["error"]
    lines = client.post("/invocations", data=b'{"inputs": "hi"}\n', headers={**JSONLINES, SESSION_HEADER: base_session})
    assert lines.status_code == 400 and "JSON Lines are not recorded in a session" in lines.json["error"]


def test_a_second_turn_while_one_runs_is_409_and_a_failed_turn_records_nothing(client, engine, tmp_path):
    session_id = new_session(client)
    engine.hold.clear()
    answers = []
    running = threading.Thread(target=lambda: answers.append(
        post(client, {"inputs": "slow one"}, headers={SESSION_HEADER: session_id})))
    running.start()
    wait_until(lambda: engine.admitted == 1)
    busy = post(client, {"inputs": "too soon"}, headers={SESSION_HEADER: session_id})
    assert busy.status_code == 409 and busy.json["error_type"] == "conflict"
    engine.hold.set()
    running.join(timeout=30)
    assert answers[0].status_code == 200
    engine.fail_after = 0
    failed = post(client, {"inputs": "boom", "stream": True}, headers={SESSION_HEADER: session_id})
    assert "error" in failed.get_data(as_text=True)
    engine.fail_after = None
    stored = json.loads((tmp_path / "sessions" / f"{session_id}.json").read_text())
    assert [m["content"] for m in stored["messages"]] == ["slow one", " SLOW ONE"]


def test_without_sessions_enabled_a_session_request_is_refused(tmp_path, engine):
    (tmp_path / "registry").mkdir()
    plain = create_app(engine, Adapters({}, tmp_path / "registry", 64, tmp_path), startup(tmp_path)).test_client()
    for body, headers in (({"requestType": "NEW_SESSION"}, {}),
                          ({"inputs": "hi"}, {SESSION_HEADER: "00000000-0000-4000-8000-000000000000"})):
        refused = post(plain, body, headers=headers)
        assert refused.status_code == 400 and "SAGEMAKER_ENABLE_STATEFUL_SESSIONS=true" in refused.json["error"]


def test_one_twin_cannot_take_every_session_of_an_instance_others_share(tmp_path, clock):
    """MAX_SESSIONS_PER_ADAPTER: one twin's callers fill their own share, not the instance's MAX_SESSIONS; the
    refusal speaks of the caller's twin only."""
    shared = Sessions(tmp_path, ttl=60, max_sessions=5, max_bytes=2000, clock=clock, max_per_adapter=2)
    alices = [shared.open("alice") for _ in range(2)]
    with pytest.raises(Overloaded) as refused:
        shared.open("alice")
    assert "this twin holds its maximum of 2 open sessions" in refused.value.message
    assert "bob" not in refused.value.message
    assert shared.open("bob").adapter == "bob" and shared.open("").adapter == ""  # the others still open theirs
    shared.close(alices[0].id, "alice")
    assert shared.open("alice").adapter == "alice"  # a closed one frees its place
    unlimited = Sessions(tmp_path / "other", ttl=60, max_sessions=5, max_bytes=2000, clock=clock)
    (tmp_path / "other").mkdir()
    assert len({unlimited.open("alice").id for _ in range(5)}) == 5  # unset: only MAX_SESSIONS
