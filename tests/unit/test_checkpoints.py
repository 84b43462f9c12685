"""Checkpoints of several instances share one S3 prefix: each host's own folder, resumed only in step."""

from train.checkpoints import COMPLETE_MARKER, checkpoint_roots, latest_checkpoint


def checkpoint(stage_dir, step, complete=True):
    folder = stage_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        (folder / COMPLETE_MARKER).touch()
    return folder


def test_one_instance_keeps_the_classic_layout(tmp_path):
    assert checkpoint_roots(tmp_path, "algo-1", ("algo-1",)) == (tmp_path, [tmp_path])
    checkpoint(tmp_path / "sft", 10)
    torn = checkpoint(tmp_path / "sft", 20, complete=False)
    assert latest_checkpoint(tmp_path / "sft") == tmp_path / "sft" / "checkpoint-10"
    assert not torn.exists()  # a checkpoint killed mid-write is removed


def test_instances_write_apart_and_resume_from_the_newest_step_all_of_them_completed(tmp_path):
    """What each instance sees after SageMaker copies the S3 prefix back: every host's folder."""
    mine, roots = checkpoint_roots(tmp_path, "algo-2", ("algo-1", "algo-2"))
    assert mine == tmp_path / "algo-2" and roots == [tmp_path / "algo-1", tmp_path / "algo-2"]
    for step in (10, 20, 30):
        checkpoint(tmp_path / "algo-2" / "sft", step)
    checkpoint(tmp_path / "algo-1" / "sft", 10)
    checkpoint(tmp_path / "algo-1" / "sft", 20)
    other_torn = checkpoint(tmp_path / "algo-1" / "sft", 30, complete=False)  # algo-1 was killed writing step 30
    peers = [root / "sft" for root in roots]
    assert latest_checkpoint(mine / "sft", peers) == mine / "sft" / "checkpoint-20"
    assert other_torn.exists()  # another instance's files are never touched
    assert latest_checkpoint(mine / "sft", [mine / "sft", tmp_path / "algo-3" / "sft"]) is None  # a host with none
