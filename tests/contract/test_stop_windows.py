"""SIGTERM outside the training loop, through the real `train` (bench/chaos_train.py's job and runner): while
the libraries load, and between SFT's last step and DPO, the job ends at once with exit 143 and its
failure file, and the rerun finishes with the model an uninterrupted run writes. Inside the loop, a step of
many micro-batches does not hold the stop back: the job saves the last completed step and exits at once, and
its rerun trains the model an uninterrupted run trains."""

import signal
import tarfile
import time

import pytest

from bench.chaos_train import make_job, model_summary, run
from local_test.tiny_model import build_tiny_model
from tests.helpers import jsonl, link_model_channel, make_tree, run_train
from train.checkpoints import verify

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


LONG_STEPS = {"max_steps": "2", "gradient_accumulation_steps": "200", "per_device_train_batch_size": "1",
              "lora_dropout": "0.1", "save_steps": "1000", "logging_steps": "1", "max_length": "64",
              "warmup_steps": "0", "validation_split": "0"}
LESSONS = [{"instruction": f"Write a short note about lesson {i}.", "output": f"Lesson {i}: measure first."}
           for i in range(400)]  # one epoch: 2 steps of 200 micro-batches, each sample seen once


def long_steps_job(root, tiny_model):
    make_tree(root, LONG_STEPS, {"train/d.jsonl": jsonl(LESSONS)})
    link_model_channel(root, tiny_model)
    return root


def test_sigterm_mid_accumulation_exits_at_once_with_the_last_step_and_the_rerun_trains_the_same_model(
        start_train, tmp_path, tiny_model):
    """SIGTERM as step 2's 200 micro-batches begin: the job stops after the current micro-batch, saves step 1
    (weights, optimizer and random state as they were when step 2 began) and exits 143. The rerun redoes step 2
    whole, on the same samples with the same dropout, and ends with an uninterrupted run's weights, bit for bit."""
    reference = long_steps_job(tmp_path / "reference", tiny_model)
    assert run_train(reference).returncode == 0

    root = long_steps_job(tmp_path / "stopped", tiny_model)
    training = start_train(root)
    assert training.wait_for_line("stage=sft step=1 "), "".join(training.output)[-3000:]
    training.process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code, rest = training.finish()
    assert code == 143, rest[-3000:]
    seconds = time.monotonic() - sent
    assert seconds < 60, f"{seconds:.1f} s from SIGTERM to exit"
    assert "stage=sft step=2 " not in rest  # it did not wait for the step to end
    sft = root / "checkpoints" / "sft"
    assert (root / "output" / "failure").read_text().startswith(
        f"training stopped by SIGTERM during sft at step 1 of 2; the newest checkpoint is {sft}/checkpoint-1")
    assert [path.name for path in sft.glob("checkpoint-*")] == ["checkpoint-1"] and verify(sft / "checkpoint-1") is None

    result = run_train(root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming sft from {sft}/checkpoint-1 (step 1)" in result.stdout
    weights = "model/model.safetensors"
    assert (root / weights).read_bytes() == (reference / weights).read_bytes()
