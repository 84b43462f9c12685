"""SIGTERM outside the training loop, through the real `train` (bench/chaos_train.py's job and runner): while
the libraries load, and between SFT's last step and DPO, the job ends at once with exit 143 and its
failure file, and the rerun finishes with the model an uninterrupted run writes."""

import signal
import tarfile

import pytest

from bench.chaos_train import make_job, model_summary, run
from local_test.tiny_model import build_tiny_model

pytestmark = pytest.mark.scenario  # make test-scenarios (CI runs it after make test)


@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    work = tmp_path_factory.mktemp("stop-windows")
    path = work / "model.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        archive.add(build_tiny_model(work / "tiny"), arcname=".")
    return path


@pytest.fixture(scope="module")
def uninterrupted(tarball, tmp_path_factory):
    """What the same job writes when nothing stops it."""
    reference = make_job(tmp_path_factory.mktemp("reference"), tarball)
    assert run(reference).code == 0
    return model_summary(reference)


@pytest.mark.parametrize("phase, delay", [("loading the libraries", 0.0), ("SFT merge and save", 0.0)])
def test_sigterm_outside_the_training_loop_exits_143_with_its_failure_file_and_the_rerun_finishes(
        tmp_path, tarball, uninterrupted, phase, delay):
    root = make_job(tmp_path / "job", tarball)
    stopped = run(root, (signal.SIGTERM, phase, delay))
    assert stopped.signalled and stopped.code == 143, stopped.lines[-20:]
    failure = (root / "output" / "failure").read_text()
    # "while <phase>", or, when it came just after the loop's last step decision, "during sft at step 24 of 24"
    assert failure.startswith("training stopped by SIGTERM "), failure
    assert not stopped.torn_looks and not (root / "model").exists()  # nothing published, nothing half-written
    again = run(root)
    assert again.code == 0 and model_summary(root) == uninterrupted
