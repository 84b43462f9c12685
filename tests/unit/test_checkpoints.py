"""Checkpoints of several instances share one folder (one S3 prefix): each instance marks its own part,
and a checkpoint counts only when every instance has."""

from train.checkpoints import COMPLETE_MARKER, Markers, is_complete, latest_checkpoint, mark_complete


def checkpoint(stage_dir, step, *markers):
    folder = stage_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    for marker in markers:
        (folder / marker).touch()
    return folder


def test_one_instance_keeps_the_classic_marker_and_removes_a_torn_checkpoint(tmp_path):
    assert Markers.for_hosts("algo-1", ("algo-1",)) == Markers()
    checkpoint(tmp_path, 10, COMPLETE_MARKER)
    torn = checkpoint(tmp_path, 20)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert not torn.exists()


def test_instances_resume_from_the_newest_step_every_one_of_them_completed(tmp_path):
    """What each instance sees after SageMaker copies the S3 prefix back: the union of all their files."""
    mine = Markers.for_hosts("algo-2", ("algo-1", "algo-2"))
    assert mine.own == ".complete-algo-2" and mine.every == (".complete-algo-1", ".complete-algo-2")
    checkpoint(tmp_path, 10, ".complete-algo-1", ".complete-algo-2")
    checkpoint(tmp_path, 20, ".complete-algo-1", ".complete-algo-2")
    half = checkpoint(tmp_path, 30, ".complete-algo-2")  # algo-1 was killed while writing step 30
    assert latest_checkpoint(tmp_path, mine) == tmp_path / "checkpoint-20"
    assert half.exists()  # never removed: part of it is another instance's

    final = tmp_path / "final"
    final.mkdir()
    mark_complete(final, mine)
    assert (final / ".complete-algo-2").is_file() and not is_complete(final, mine)
    mark_complete(final, Markers.for_hosts("algo-1", ("algo-1", "algo-2")))
    assert is_complete(final, mine)
