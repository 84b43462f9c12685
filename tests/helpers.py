"""Helpers the tests share: /opt/ml trees, the real `train` and `serve` as subprocesses, and what they answer.
Fixtures live in tests/conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from local_test.harness import free_port, process_tree, sse_events  # noqa: F401 (the tests import them from here)
from local_test.tiny_model import TINY_ROWS, build_tiny_model  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_tree(root: Path, hyperparameters: dict | None = None, files: dict[str, str] | None = None) -> Path:
    """A SageMaker /opt/ml tree: hyperparameters.json (values as given: strings, as SageMaker sends them)
    and channel files ({"train/data.jsonl": text})."""
    (root / "input" / "config").mkdir(parents=True, exist_ok=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters or {}))
    for relative, text in (files or {}).items():
        path = root / "input" / "data" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def link_model_channel(root: Path, model: Path) -> None:
    channel = root / "input" / "data" / "model"
    channel.parent.mkdir(parents=True, exist_ok=True)
    channel.symlink_to(model, target_is_directory=True)


def run_train(root: Path, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "train")], env={**os.environ, "SAGEMAKER_BASE_DIR": str(root), **env},
        capture_output=True, text=True, timeout=timeout,
    )


class Training:
    """A real `train` in its own session, its output read line by line by a thread, so a test waits for a line
    against a deadline. kill() SIGKILLs whatever of it is left; the `start_train` fixture calls it when the test
    ends, so a test that fails midway leaves no training behind to load the machine."""

    def __init__(self, root: Path, **env):
        self.process = subprocess.Popen(
            [str(BIN / "train")], env={**os.environ, "SAGEMAKER_BASE_DIR": str(root), **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.output: list[str] = []  # the lines read so far
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)  # the end of its output

    def _next(self, deadline: float) -> str | None:
        line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        if line is None:
            self._lines.put(None)  # ended for every later reader too
        else:
            self.output.append(line)
        return line

    def wait_for_line(self, prefix: str, timeout: float = 600) -> bool:
        """Read until a line that starts with `prefix` (True), or its output ends or the deadline passes."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Empty):
            while (line := self._next(deadline)) is not None:
                if line.startswith(prefix):
                    return True
        return False

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """Its exit code, once it has exited, and its output after what was read before."""
        read = len(self.output)
        self.process.wait(timeout=timeout)
        with contextlib.suppress(queue.Empty):  # a child that outlived it may hold the pipe: not waited for
            while self._next(time.monotonic() + 30) is not None:
                pass
        return self.process.returncode, "".join(self.output[read:])

    def kill(self) -> None:
        for pid, _ in session_members(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()


REAP_SECONDS = 90  # after SIGTERM, until a server and what it started are taken for stuck
STOPPING: list["Server"] = []  # servers told to stop, still draining (conftest.py waits for them at the end)


class Server:
    """A real `serve` process (gunicorn + Flask) on a free port. Its output goes to a file, not a pipe: a
    server that lives for the whole session writes more than a pipe holds, and nobody reads it until the end."""

    def __init__(self, root: Path, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        descriptor, self._log = tempfile.mkstemp(prefix="serve-", suffix=".log")
        with open(descriptor, "a") as log:  # appended to: reading it meanwhile moves no offset of the server's
            self.process = subprocess.Popen(
                [str(BIN / "serve")],
                env={**os.environ, "SAGEMAKER_BASE_DIR": str(root), "SAGEMAKER_BIND_TO_PORT": str(self.port), **env},
                stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            )
        self.ping_codes: list[int] = []
        self.output: str | None = None
        self.leftovers: list[str] = []  # processes still there a while after SIGTERM (killed then)
        self._reaper: threading.Thread | None = None

    def wait_ready(self, timeout: float = 180) -> None:
        """Until /ping answers 200. A refused connection or a slow answer (a worker still importing, a loaded
        machine) is retried until the deadline; a server that exits, or is not ready by then, fails with its
        output, and nothing it started is left running."""
        try:
            self.ping_codes += wait_for_ping(self.url, 200, timeout, process=self.process)
        except (RuntimeError, TimeoutError) as e:
            raise type(e)(f"{e}\n{self.stop()}") from None

    def invoke(self, body, **kwargs) -> requests.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = kwargs.pop("headers", {"Content-Type": "application/json"})
        timeout = kwargs.pop("timeout", 120)
        return requests.post(self.url + "/invocations", data=data, headers=headers, timeout=timeout, **kwargs)

    def engines(self) -> list[int]:
        """The server's vLLM engine-core processes (one per worker)."""
        def named(pid: int) -> bool:
            with contextlib.suppress(OSError):
                return "EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") + \
                    Path(f"/proc/{pid}/comm").read_text()
            return False
        return [pid for pid in process_tree(self.process.pid) if named(pid)]

    def stop(self) -> str:
        """SIGTERM (what SageMaker sends), then the server's whole output once it has exited. Safe to call
        twice."""
        self.stop_soon()
        self._reaper.join()
        return self.output

    def stop_soon(self) -> None:
        """SIGTERM, without waiting: gunicorn and vLLM take about 7 s to drain and exit, idle, while the next
        test starts. The output is collected in the background; conftest.py waits for every server at the end."""
        if self._reaper is None:
            self.process.terminate()
            self._reaper = threading.Thread(target=self._reap, daemon=True)
            self._reaper.start()
            STOPPING.append(self)

    def _reap(self) -> None:
        """The output, once the server and every process it started (its session) have exited. What is still
        there REAP_SECONDS after SIGTERM (gunicorn drains for 25 s) is SIGKILLed and kept in leftovers, which
        fail the session (conftest.py): a server must not leave vLLM's engine processes behind."""
        deadline = time.monotonic() + REAP_SECONDS
        while time.monotonic() < deadline and (self.process.poll() is None or session_members(self.process.pid)):
            time.sleep(0.2)
        for pid, args in session_members(self.process.pid):
            self.leftovers.append(f"{pid} {args}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        self.output = self.log()
        os.unlink(self._log)

    def log(self) -> str:
        """What the server has written so far."""
        return Path(self._log).read_text(errors="replace")


def session_members(session: int) -> list[tuple[int, str]]:
    """The processes still running in session `session` (a process started with start_new_session=True and
    everything it started): pid and command line."""
    listed = subprocess.run(["ps", "-o", "pid=,args=", "-s", str(session)], capture_output=True, text=True)
    members = []
    for line in listed.stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        if running(int(pid)):
            members.append((int(pid), args))
    return members


@contextlib.contextmanager
def frozen(pids: list[int]):
    """The processes `pids` (a server's engines) stopped inside the block (SIGSTOP), continued after: no answer
    makes progress, so a test can act while one is surely unfinished, however slow the machine."""
    assert pids, "no process to freeze"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for_ping(url: str, wanted: int, timeout: float, process: subprocess.Popen | None = None) -> list[int]:
    """Ask /ping until it answers `wanted`; the codes it answered on the way. Each try may take up to 5 s
    (a busy worker); connection errors and slow answers are retried until `timeout`, then it fails saying
    what /ping answered."""
    deadline = time.monotonic() + timeout
    codes: list = []
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}")
        try:
            codes.append(requests.get(url + "/ping", timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                         .status_code)
        except requests.RequestException as e:  # refused (not listening yet, or between workers), or slow
            codes.append(type(e).__name__)
        if codes[-1] == wanted:
            return codes
        time.sleep(0.05)
    raise TimeoutError(f"/ping did not answer {wanted} within {timeout} s; it answered {codes[-5:]}")


def training_report(root: Path) -> dict:
    return json.loads((root / "model" / "training_report.json").read_text())


def loads_and_generates(root: Path) -> None:
    """The model directory `train` published is complete and generates, checked with plain transformers:
    for tests about training, where starting a real server (vLLM: about 20 s here) would add nothing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from container.model_dir import load_spec

    assert load_spec(root / "model").weights == "merged"
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model", use_safetensors=True)
    with torch.inference_mode():
        out = model.generate(**tokenizer("Write about lesson 1.", return_tensors="pt"), max_new_tokens=3,
                             do_sample=False)
    assert out.shape[1] > 3
