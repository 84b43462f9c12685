"""Shared fixtures: a tiny random Llama with a real BPE tokenizer, /opt/ml trees, and a live `serve`.

Tests run the real `train` and `serve` entrypoints as subprocesses (the same executables the image's
ENTRYPOINT runs) against temporary /opt/ml trees selected with SAGEMAKER_BASE_DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
from local_test.tiny_model import TINY_ROWS, build_tiny_model  # noqa: F401 (tests import TINY_ROWS from here)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_served_model(tiny_model, tmp_path_factory) -> Path:
    """An /opt/ml tree whose model/ holds the tiny model in the serving format (no training needed)."""
    from container.model_dir import ServingSpec

    root = tmp_path_factory.mktemp("served")
    shutil.copytree(tiny_model, root / "model")
    ServingSpec(base_model="tiny", max_input_tokens=400, max_total_tokens=512, max_new_tokens=16).write(root / "model")
    return root


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `serve` process (gunicorn + Flask) on a free port."""

    def __init__(self, root: Path, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(BIN / "serve")],
            env={**os.environ, "SAGEMAKER_BASE_DIR": str(root), "SAGEMAKER_BIND_TO_PORT": str(self.port), **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.ping_codes: list[int] = []
        self.output: str | None = None

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}:\n{self.process.stdout.read()}")
            try:
                code = requests.get(self.url + "/ping", timeout=2).status_code
            except requests.ConnectionError:
                time.sleep(0.05)
                continue
            self.ping_codes.append(code)
            if code == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(f"serve not ready after {timeout} s; /ping codes {self.ping_codes[-5:]}")

    def invoke(self, body, **kwargs) -> requests.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = kwargs.pop("headers", {"Content-Type": "application/json"})
        timeout = kwargs.pop("timeout", 120)
        return requests.post(self.url + "/invocations", data=data, headers=headers, timeout=timeout, **kwargs)

    def stop(self) -> str:
        """SIGTERM (what SageMaker sends), then the server's whole output. Safe to call twice."""
        if self.output is None:
            self.process.terminate()
            try:
                self.output, _ = self.process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.output, _ = self.process.communicate()
        return self.output


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
        out = model.generate(**tokenizer("Write about lesson 1.", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3


@pytest.fixture(scope="session")
def server(tiny_served_model):
    """One real server on the tiny model, shared by the tests that only send it requests. float32, so that
    a request's answer does not depend on what it was batched with; its /ping codes while it loaded are
    kept in server.ping_codes."""
    server = Server(tiny_served_model, DTYPE="float32")
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture
def serve_tree():
    """Start `serve` on a tree; stops every server the test started."""
    servers: list[Server] = []

    def start(root: Path, **env) -> Server:
        server = Server(root, **env)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()
