"""SageMaker's stateful sessions: a conversation kept by the instance, one turn per request.

With SAGEMAKER_ENABLE_STATEFUL_SESSIONS=true, a body `{"requestType": "NEW_SESSION"}` opens a session: the
answer carries `X-Amzn-SageMaker-New-Session-Id: <id>; Expires=<UTC time>`, and SageMaker routes every
request with `X-Amzn-SageMaker-Session-Id: <id>` to this instance. Such a request sends only its new turn;
the prompt is the session's messages so far plus that turn, through the chat template, so each turn's
prompt begins with the previous one and vLLM's prefix cache reuses its KV. `{"requestType": "CLOSE"}`
ends it (`X-Amzn-SageMaker-Closed-Session-Id`). The shapes are those of SageMaker's developer guide and
AWS's model-hosting-container-standards library.

Every gunicorn worker of the instance sees every session: they live in a folder the workers share (under
/dev/shm unless SAGEMAKER_SESSIONS_PATH says), one JSON file per session written whole by rename, and a
lock file that a turn holds while it runs, so a session has one turn at a time (a second gets 409); the lock
file's modification time is the session's expiry, so counting the open sessions reads no conversation. What
changes the set of sessions (opening one, which counts them first; closing; recording a turn, which must not
bring back a session closed meanwhile) holds the folder's own lock, so MAX_SESSIONS holds across workers. A
worker that dies loses only its turn in flight (its answer is not recorded: the client sends that turn
again) and its KV cache (the next turn's prompt is computed again, with the same answer). A session
expires SAGEMAKER_SESSIONS_EXPIRATION seconds after it opened, as its Expires said. A full folder refuses
the turn or the opening (429), leaving nothing half-written.

Isolation: an id is 122 random bits, checked against its exact shape before it names a file; a session is
bound to the adapter (inference component) that opened it, and asked for from another one it is as
unknown as an id that never existed. No error names another session or its content. A session's prompts
are salted in vLLM's prefix cache with a hash of its id (`cache_salt`): its turns reuse each other's blocks,
and no other caller can time whether a conversation's text is cached. The price is the system prompt's few
blocks, computed once per session rather than once per instance.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from dataclasses import replace
from pathlib import Path

from serve.errors import BadRequest, Conflict, Overloaded, ValidationError
from serve.schemas import GenerateRequest

SESSION_HEADER = "X-Amzn-SageMaker-Session-Id"
NEW_SESSION_HEADER = "X-Amzn-SageMaker-New-Session-Id"
CLOSED_SESSION_HEADER = "X-Amzn-SageMaker-Closed-Session-Id"
NEW_SESSION, CLOSE = "NEW_SESSION", "CLOSE"
SESSION_ID_CHARS = set("0123456789abcdef-")
FOLDER_LOCK = ".sessions-lock"  # held while the set of sessions changes
STAGING_GRACE = 300.0  # seconds after which a staging file nobody renamed is a dead worker's, and swept


@dataclass(frozen=True)
class Session:
    id: str
    adapter: str  # the inference component's adapter that opened it ("" for none)
    expires: float  # epoch seconds
    messages: tuple[dict, ...] = ()

    @property
    def expires_at(self) -> str:
        """The Expires SageMaker's runtime API expects: UTC, to the second, with a Z."""
        return datetime.fromtimestamp(self.expires, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Turn:
    """One turn of a session, holding its lock until `answered` or `release`: `request` is the one to
    generate (the session's messages, then the turn's)."""

    def __init__(self, sessions: Sessions, session: Session, lock: int):
        self.sessions, self.session, self._lock = sessions, session, lock
        self.new_messages: list[dict] = []
        self.request: GenerateRequest | None = None

    def answered(self, text: str) -> None:
        """Record the turn and its answer, and let the next turn in."""
        try:
            with self.sessions.folder_lock():
                if self.sessions.path(self.session.id).exists():  # not closed or expired meanwhile
                    messages = (*self.session.messages, *self.new_messages, {"role": "assistant", "content": text})
                    self.sessions.write(replace(self.session, messages=messages))
        finally:
            self.release()

    def release(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)  # closing the descriptor drops its flock
            self._lock = -1


class Sessions:
    def __init__(self, folder: Path, ttl: float, max_sessions: int, max_bytes: int, clock=time.time,
                 max_per_adapter: int = 0):
        self.folder, self.ttl, self.clock = folder, ttl, clock
        self.max_sessions, self.max_bytes = max_sessions, max_bytes
        self.max_per_adapter = max_per_adapter  # 0: no share of MAX_SESSIONS is kept for the other twins

    @staticmethod
    def create_folder(path: str) -> Path:
        """The folder the workers share: `path` when given, else a new one in /dev/shm (memory), else in /tmp."""
        if path:
            Path(path).mkdir(parents=True, exist_ok=True)
            return Path(path)
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        return Path(tempfile.mkdtemp(prefix="llm-twin-sessions-", dir=shm))

    @staticmethod
    def room_warning(folder: Path, max_sessions: int, max_bytes: int) -> str | None:
        """What to say at start when the folder cannot hold the most the sessions may take."""
        most, free = max_sessions * max_bytes, shutil.disk_usage(folder).free
        if most <= free:
            return None
        return (f"sessions may take up to {most / 2**20:.0f} MiB (MAX_SESSIONS={max_sessions} x MAX_SESSION_BYTES="
                f"{max_bytes}) and their folder has {free / 2**20:.0f} MiB free (in /dev/shm, vLLM's shared memory "
                "too): past that a turn or an opening gets 429. Lower them, or set SAGEMAKER_SESSIONS_PATH")

    def path(self, session_id: str) -> Path:
        return self.folder / f"{session_id}.json"

    def open(self, adapter: str) -> Session:
        """A new session, after the expired ones are swept; 429 when the instance holds its maximum."""
        with self.folder_lock():
            if self._sweep() >= self.max_sessions:
                raise Overloaded(f"this instance holds its maximum of {self.max_sessions} open sessions "
                                 "(MAX_SESSIONS): close one, or try again after sessions expire")
            if self.max_per_adapter and self._held_by(adapter) >= self.max_per_adapter:
                raise Overloaded(f"this twin holds its maximum of {self.max_per_adapter} open sessions on this "
                                 "instance (MAX_SESSIONS_PER_ADAPTER): close one, or try again after sessions expire")
            session = Session(str(uuid.uuid4()), adapter, self.clock() + self.ttl)
            lock = self.folder / f"{session.id}.lock"
            try:
                lock.write_text(adapter, encoding="utf-8")  # whose it is, for MAX_SESSIONS_PER_ADAPTER
                os.utime(lock, (session.expires, session.expires))  # what _sweep reads
                self.write(session)
            except BaseException as e:
                self._remove(session.id)
                raise _storage_failed(e) if isinstance(e, OSError) else e
        return session

    def turn(self, session_id: str, request: GenerateRequest, adapter: str) -> Turn:
        """`request`, for `adapter` ("" for none), as the next turn of the session, which is locked for it: 400
        when the session is unknown, expired or another adapter's; 409 while another turn of it runs; 422 for a
        request that cannot be a turn."""
        new_messages = _new_messages(request)
        session = self.find(session_id, adapter)
        try:
            lock = os.open(self.folder / f"{session.id}.lock", os.O_RDWR)
        except FileNotFoundError:  # closed since
            raise _not_found(session_id) from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise Conflict("another turn of this session is still running: send the next turn after its answer "
                           "ends") from None
        try:
            turn = Turn(self, self.find(session_id, adapter), lock)  # read again, under the lock
            self._check_size(turn.session, new_messages)
            turn.request = replace(request, history=turn.session.messages,
                                   cache_salt=session_salt(session_id, request.cache_salt))
        except BaseException:
            os.close(lock)
            raise
        turn.new_messages = new_messages
        return turn

    def close(self, session_id: str, adapter: str) -> None:
        """End a session (a turn still running is not waited for: its answer is not recorded)."""
        session = self.find(session_id, adapter)
        with self.folder_lock():
            self._remove(session.id)

    def find(self, session_id: str, adapter: str) -> Session:
        if not _valid_id(session_id):
            raise BadRequest(f"{SESSION_HEADER} is not a session id this endpoint gave: open a session with "
                             '{"requestType": "NEW_SESSION"}')
        try:
            entry = json.loads(self.path(session_id).read_text(encoding="utf-8"))
        except FileNotFoundError:
            entry = None
        if entry is None or entry["adapter"] != adapter:
            raise _not_found(session_id)
        if entry["expires"] <= self.clock():
            with self.folder_lock():
                self._remove(session_id)
            raise BadRequest(f"session {session_id} expired at {Session(session_id, '', entry['expires']).expires_at}"
                             ': open a new one with {"requestType": "NEW_SESSION"}')
        return Session(session_id, entry["adapter"], entry["expires"], tuple(entry["messages"]))

    def _check_size(self, session: Session, messages: list[dict]) -> None:
        """Refuse a turn that would take the conversation past max_bytes."""
        size = len(json.dumps([*session.messages, *messages]).encode())
        if size > self.max_bytes:
            raise ValidationError(f"this session's conversation would be {size} bytes, over this endpoint's "
                                  f"{self.max_bytes} (MAX_SESSION_BYTES): close it and open a new one")

    def write(self, session: Session) -> None:
        """The session's file, replaced whole; a folder that is full (or failing) is a 429, and leaves nothing."""
        entry = {"adapter": session.adapter, "expires": session.expires, "messages": list(session.messages)}
        staging = None
        try:
            descriptor, staging = tempfile.mkstemp(dir=self.folder, prefix=f".{session.id}.", suffix=".tmp")
            with os.fdopen(descriptor, "w", encoding="utf-8") as f:
                json.dump(entry, f)
            os.replace(staging, self.path(session.id))
        except OSError as e:
            if staging is not None:
                Path(staging).unlink(missing_ok=True)
            raise _storage_failed(e) from None

    @contextmanager
    def folder_lock(self):
        """The instance's lock on its set of sessions (every worker's threads included: one descriptor each)."""
        try:
            descriptor = os.open(self.folder / FOLDER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise _storage_failed(e) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)

    def _sweep(self) -> int:
        """Remove expired sessions, and staging files that a dead worker left; the number still open. Reads
        each session's expiry from its lock file's time (no conversation is read), under the folder lock."""
        now, open_now = self.clock(), 0
        for lock in self.folder.glob("*.lock"):
            try:
                expires = lock.stat().st_mtime
            except FileNotFoundError:  # expired and removed by a turn that found it so
                continue
            if expires <= now:
                self._remove(lock.stem)
            else:
                open_now += 1
        for staging in self.folder.glob(".*.tmp"):
            try:
                if staging.stat().st_mtime < time.time() - STAGING_GRACE:
                    staging.unlink()
            except FileNotFoundError:  # renamed meanwhile
                continue
        return open_now

    def _held_by(self, adapter: str) -> int:
        """The open sessions of `adapter` ("" for the served model), from their lock files' contents (under the
        folder lock, after a sweep); no conversation is read."""
        held = 0
        for lock in self.folder.glob("*.lock"):
            try:
                held += lock.read_text(encoding="utf-8") == adapter
            except (FileNotFoundError, UnicodeDecodeError):
                continue
        return held

    def _remove(self, session_id: str) -> None:
        self.path(session_id).unlink(missing_ok=True)
        (self.folder / f"{session_id}.lock").unlink(missing_ok=True)


def request_type(body: dict) -> str:
    """NEW_SESSION or CLOSE, from a body that holds `requestType` and nothing else."""
    kind = body.get("requestType")
    if kind not in (NEW_SESSION, CLOSE) or len(body) != 1:
        raise BadRequest('a session request is {"requestType": "NEW_SESSION"} or {"requestType": "CLOSE"}, and '
                         "nothing else")
    return kind


def _new_messages(request: GenerateRequest) -> list[dict]:
    """A turn's new messages: a chat's `messages`, or a TGI request's `inputs` as the user's turn."""
    if request.completion:
        raise ValidationError("a session turn is a chat turn: send TGI's 'inputs' or OpenAI's 'messages', not a "
                              "completion's 'prompt'")
    if request.params.best_of > 1:
        raise ValidationError("a session turn has one answer, which the next turn continues: leave 'best_of' and "
                              "'n' at 1")
    if request.params.truncate is not None:
        raise ValidationError("'truncate' is not available in a session turn: the conversation is kept whole")
    return request.messages if request.messages is not None else [{"role": "user", "content": request.inputs}]


def _storage_failed(error: OSError) -> Overloaded:
    return Overloaded(f"this instance cannot store its sessions now ({error.strerror}): close sessions, or try again "
                      "after some expire")


def _not_found(session_id: str) -> BadRequest:
    return BadRequest(f"session not found: {session_id} (closed, expired, or never opened here); open a new one "
                      'with {"requestType": "NEW_SESSION"}')


def _valid_id(session_id: str) -> bool:
    return len(session_id) == 36 and set(session_id) <= SESSION_ID_CHARS


def session_salt(session_id: str, client_salt: str | None) -> str:
    """The vLLM cache salt of a session's turns: a hash of the id (which then appears in no engine structure),
    and of the client's own `cache_salt` when it sent one."""
    text = f"session {session_id}" if client_salt is None else f"session {session_id} salt {client_salt}"
    return hashlib.sha256(text.encode()).hexdigest()
