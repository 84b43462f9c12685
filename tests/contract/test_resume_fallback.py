"""Checkpoints a restart can trust, through the real `train`: what S3 can hold after a spot kill (a shard cut
short, a file missing, though the marker and the manifest are there) is passed over, and the job resumes from
the newest checkpoint that verifies, or starts over when none does, saying which and why."""

import pytest

from train.checkpoints import verify

from tests.helpers import TINY_ROWS, jsonl, link_model_channel, make_tree, run_train, training_report

pytestmark = pytest.mark.scenario  # make test-scenarios (CI runs it after make test), with the other spot restarts

JOB = {"max_steps": "3", "save_steps": "1", "save_total_limit": "3", "per_device_train_batch_size": "2",
       "gradient_accumulation_steps": "1", "max_length": "64", "warmup_steps": "0", "validation_split": "0"}


def trained(root) -> str:
    result = run_train(root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_a_restart_passes_over_checkpoints_that_fail_verification_and_starts_over_when_none_verifies(
        tmp_path, tiny_model):
    root = make_tree(tmp_path, JOB, {"train/d.jsonl": jsonl(TINY_ROWS)})
    link_model_channel(root, tiny_model)
    trained(root)
    uninterrupted = (root / "model" / "model.safetensors").read_bytes()
    sft = root / "checkpoints" / "sft"
    assert all((sft / f"checkpoint-{step}" / name).is_file() for step in (1, 2, 3)
               for name in (".complete", "manifest.json"))

    shard = sft / "checkpoint-3" / "adapter_model.safetensors"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)  # uploaded while still being written
    (sft / "checkpoint-2" / "optimizer.pt").unlink()  # never uploaded
    log = trained(root)
    assert (f"checkpoint-3 fails verification: adapter_model.safetensors is {size // 2} bytes, the manifest says "
            f"{size}; passing over it (kept, never loaded)") in log
    assert "checkpoint-2 fails verification: optimizer.pt is missing; passing over it" in log
    assert "resuming from checkpoint-1, the newest checkpoint that verifies" in log
    assert f"resuming sft from {sft}/checkpoint-1 (step 1)" in log and "stage=sft step=3 " in log
    assert training_report(root)["stages"]["sft"]["resumed_from_step"] == 1
    assert (root / "model" / "model.safetensors").read_bytes() == uninterrupted  # steps 2 and 3 redone exactly
    # training reached steps 2 and 3 again: fresh, sealed checkpoints replaced the ones passed over
    assert all(verify(sft / f"checkpoint-{step}") is None for step in (1, 2, 3))

    for step in (1, 2, 3):  # same sizes, other bytes: only the hashes tell
        weights = sft / f"checkpoint-{step}" / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    log = trained(root)
    assert ("checkpoint-1 fails verification: adapter_model.safetensors does not match its SHA-256 in the "
            "manifest") in log
    assert ("no checkpoint of sft verifies (checkpoint-3, checkpoint-2, checkpoint-1 passed over): starting sft "
            "over from step 0") in log
    assert "resuming sft from" not in log and "stage=sft step=1 " in log and "stage=sft step=3 " in log
    assert "resumed_from_step" not in training_report(root)["stages"]["sft"]
    assert (root / "model" / "model.safetensors").read_bytes() == uninterrupted
