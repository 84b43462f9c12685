"""Shared fixtures: a tiny random Llama with a real BPE tokenizer, /opt/ml trees, and a live `serve`.

Tests run the real `train` and `serve` entrypoints as subprocesses (the same executables the image's
ENTRYPOINT runs) against temporary /opt/ml trees selected with SAGEMAKER_BASE_DIR (tests/helpers.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REAP_SECONDS, REPO, STOPPING, Server, Training, build_tiny_model, make_tree, run_train


@pytest.fixture(scope="session", autouse=True)
def entry_points_run_this_checkout():
    """`serve` and `train` run as subprocesses import this checkout through the venv's editable install, which
    points at the last checkout that ran `pip install -e .` with it (a clone sharing this venv re-points it).
    Where nothing is installed (tests/gpu on a bare machine), there is nothing to check."""
    found = subprocess.run([sys.executable, "-c", "import serve; print(serve.__file__)"], cwd="/",
                           capture_output=True, text=True)
    if found.returncode == 0:
        where = Path(found.stdout.strip()).parent.parent
        assert where == REPO, f"the venv runs {where}, not this checkout: run `.venv/bin/pip install --no-deps -e .`"


@pytest.fixture(scope="session", autouse=True)
def servers_exit():
    """Every server a test stopped has exited by the end of the session, with every process it started."""
    yield
    for server in STOPPING:
        server.stop()
    leftovers = [f"{server.url}: {process}" for server in STOPPING for process in server.leftovers]
    assert not leftovers, f"still running {REAP_SECONDS} s after SIGTERM (killed then):\n" + "\n".join(leftovers)


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


@pytest.fixture(scope="session")
def smollm2_twin(tmp_path_factory) -> Path:
    """The demo's path on the real embedded model, trained once for the tests that need a real twin: `train`
    with no model named (so the embedded SmolLM2), a short SFT on local_test's sample data."""
    root = tmp_path_factory.mktemp("smollm2-twin")
    shutil.copytree(REPO / "local_test" / "test_dir" / "input", root / "input",
                    ignore=shutil.ignore_patterns("scratch"))
    make_tree(root, {"max_steps": "2", "per_device_train_batch_size": "2", "gradient_accumulation_steps": "1",
                     "max_length": "128", "warmup_steps": "0", "learning_rate": "1e-4", "validation_split": "0"})
    result = run_train(root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


@pytest.fixture(scope="session")
def server(tiny_served_model):
    """One real server on the tiny model, shared by the tests that only send it requests. float32, so that
    a request's answer does not depend on what it was batched with; its /ping codes while it loaded are
    kept in server.ping_codes. It keeps SageMaker's stateful sessions (tests/contract/test_conversations.py)."""
    server = Server(tiny_served_model, DTYPE="float32", SAGEMAKER_ENABLE_STATEFUL_SESSIONS="true")
    server.wait_ready()
    yield server
    server.stop_soon()


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
        server.stop_soon()


@pytest.fixture
def start_train():
    """Start `train` on a tree (helpers.Training); whatever of it is left when the test ends is killed."""
    started: list[Training] = []

    def start(root: Path, **env) -> Training:
        started.append(Training(root, **env))
        return started[-1]

    yield start
    for training in started:
        training.kill()
