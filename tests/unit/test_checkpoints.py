"""train/checkpoints.py: checkpoints are sealed with a manifest (size and SHA-256 of every file) and a marker; a
restart resumes from the newest one that verifies, passing over (and keeping) the others; several instances
seal their own parts of one shared folder; SIGTERM mid-accumulation saves the last completed step as it was."""

import hashlib
import json
import logging
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState

from train.checkpoints import (COMPLETE_MARKER, MarkComplete, Markers, StopAtNextMicroBatch, is_complete,
                               mark_complete, newest_saved, resume_checkpoint, verify)
from train.stop import Stop


def checkpoint(stage_dir, step, *markers, weights=b"w" * 100):
    """A checkpoint folder as the Trainer leaves it, sealed by each of `markers` (Markers objects)."""
    folder = stage_dir / f"checkpoint-{step}"
    (folder / f"global_step{step}").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "model.safetensors").write_bytes(weights)
    (folder / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 50)
    for seal in markers:
        mark_complete(folder, seal)
    return folder


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_the_manifest_lists_every_file_with_its_size_and_sha256_and_is_written_whole(tmp_path):
    folder = checkpoint(tmp_path, 5, Markers())
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(manifest) == {"trainer_state.json", "model.safetensors",
                             "global_step5/zero_pp_rank_0_mp_rank_00_optim_states.pt"}  # no marker, no manifest
    assert manifest["model.safetensors"] == {"size": 100, "sha256": hashlib.sha256(b"w" * 100).hexdigest()}
    assert (folder / COMPLETE_MARKER).is_file() and not list(folder.glob("*.tmp"))
    assert verify(folder) is None


def test_verify_names_the_first_thing_wrong(tmp_path):
    folder = checkpoint(tmp_path, 5, Markers())
    truncate(folder / "model.safetensors", 60)
    assert verify(folder) == "model.safetensors is 60 bytes, the manifest says 100"
    (folder / "model.safetensors").write_bytes(b"x" * 100)  # same size, other bytes
    assert verify(folder) == "model.safetensors does not match its SHA-256 in the manifest (same size, other bytes)"
    (folder / "model.safetensors").unlink()
    assert verify(folder) == "model.safetensors is missing"
    (folder / "manifest.json").write_text('{"files": {"../../etc/passwd": {"size": 1, "sha256": "x"}}}')
    assert verify(folder) == "the manifest names '../../etc/passwd', which is outside the checkpoint"
    (folder / "manifest.json").write_text('{"files": ')  # a manifest cut short is not trusted either
    assert verify(folder).startswith("manifest.json is unreadable (JSONDecodeError")
    (folder / "manifest.json").write_text('{"files": {"model.safetensors": {"size": 1e400, "sha256": "x"}}}')
    assert verify(folder).startswith("manifest.json is unreadable (OverflowError")  # not a crash at every restart
    (folder / "manifest.json").unlink()  # a marker alone (an older image's checkpoint, or S3 lagging) is not enough
    assert verify(folder) == "manifest.json is missing (writing it was cut short, or it did not reach S3)"


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies_and_keeps_the_others(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    checkpoint(tmp_path, 2, Markers())
    four = checkpoint(tmp_path, 4, Markers())
    six = checkpoint(tmp_path, 6, Markers())
    torn = checkpoint(tmp_path, 8)  # killed while writing: no marker, no manifest
    truncate(six / "model.safetensors", 10)
    (four / "trainer_state.json").unlink()
    assert resume_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert not torn.exists()  # removed, as before: one instance wrote it and never finished
    assert six.exists() and four.exists()  # failing verification is not a reason to destroy anything
    lines = [r.getMessage() for r in caplog.records]
    assert "checkpoint-6 fails verification: model.safetensors is 10 bytes, the manifest says 100; passing over it " \
           "(kept, never loaded)" in lines
    assert "checkpoint-4 fails verification: trainer_state.json is missing; passing over it (kept, never " \
           "loaded)" in lines
    assert "resuming from checkpoint-2, the newest checkpoint that verifies" in lines

    truncate(tmp_path / "checkpoint-2" / "model.safetensors", 0)
    caplog.clear()
    assert resume_checkpoint(tmp_path) is None
    assert caplog.records[-1].getMessage() == (
        f"no checkpoint of {tmp_path.name} verifies (checkpoint-6, checkpoint-4, checkpoint-2 passed over): "
        f"starting {tmp_path.name} over from step 0")
    assert newest_saved(tmp_path) == six  # what a stopped job names: this instance's newest, not verified


def test_one_instance_keeps_the_classic_marker_and_removes_a_torn_checkpoint(tmp_path):
    assert Markers.for_hosts("algo-1", ("algo-1",)) == Markers()
    checkpoint(tmp_path, 10, Markers())
    torn = checkpoint(tmp_path, 20)
    assert resume_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert not torn.exists()


def test_instances_resume_from_the_newest_step_every_one_of_them_completed(tmp_path):
    """What each instance sees after SageMaker copies the S3 prefix back: the union of all their files."""
    hosts = ("algo-1", "algo-2")
    first, mine = (Markers.for_hosts(host, hosts) for host in hosts)
    assert mine.own == ".complete-algo-2" and mine.every == (".complete-algo-1", ".complete-algo-2")
    assert mine.own_manifest == "manifest-algo-2.json"
    checkpoint(tmp_path, 10, first, mine)
    checkpoint(tmp_path, 20, first, mine)
    half = checkpoint(tmp_path, 30, mine)  # algo-1 was killed while writing step 30
    assert resume_checkpoint(tmp_path, mine) == tmp_path / "checkpoint-20"
    assert half.exists()  # never removed: part of it is another instance's

    final = tmp_path / "final"
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"m")
    mark_complete(final, mine)
    assert (final / ".complete-algo-2").is_file() and not is_complete(final, mine)
    mark_complete(final, first)
    assert is_complete(final, mine)


def test_a_file_several_instances_wrote_verifies_against_any_of_their_entries(tmp_path):
    """Both instances write trainer_state.json; S3 keeps the copy uploaded last. Either whole copy verifies; a
    copy neither wrote (a partial upload) does not."""
    hosts = ("algo-1", "algo-2")
    first, second = (Markers.for_hosts(host, hosts) for host in hosts)
    folder = checkpoint(tmp_path, 10)
    (folder / "trainer_state.json").write_text('{"global_step": 10, "host": 1}')  # algo-1's copy
    mark_complete(folder, first)
    (folder / "trainer_state.json").write_text('{"global_step": 10, "host": 2}')  # algo-2's own copy
    mark_complete(folder, second)
    assert verify(folder, first) is None
    (folder / "trainer_state.json").write_text('{"global_step": 10, "host": 1}')  # algo-1's copy won the upload
    assert verify(folder, second) is None
    (folder / "trainer_state.json").write_text('{"global_step": 10, "host": 9}')
    assert verify(folder, first).startswith("trainer_state.json does not match its SHA-256")


class FakeTrainer:
    """What StopAtNextMicroBatch uses of a Trainer: the model, the FLOP count, the save and the on_save event."""

    def __init__(self, state):
        self.model = self.model_wrapped = torch.nn.Linear(2, 1)
        self.current_flos = 0.0
        self.state = state
        self.saves = []
        self.callback_handler = SimpleNamespace(on_save=lambda args, state, control: self.saves.append("on_save"))

    def _save_checkpoint(self, model, trial):
        self.saves.append((self.state.global_step, self.state.num_input_tokens_seen, self.current_flos,
                           random.random(), torch.rand(1).item(), self.model.weight.grad))

    def micro_batch(self):
        """A forward and backward: randomness drawn (dropout), tokens and FLOPs counted, gradients accumulated."""
        random.random(), torch.rand(3)
        self.state.num_input_tokens_seen += 7
        self.current_flos += 1e6
        self.model(torch.ones(1, 2)).sum().backward()


def test_sigterm_mid_accumulation_saves_the_last_completed_step_as_it_was_when_the_next_began(tmp_path):
    stop = Stop()
    state, control = TrainerState(global_step=3, num_input_tokens_seen=21), TrainerControl()
    trainer = FakeTrainer(state)
    callback = StopAtNextMicroBatch(stop)
    callback.attach(trainer)
    args = SimpleNamespace(output_dir=str(tmp_path))
    callback.on_train_begin(args, state, control)  # resumed from checkpoint-3: it is not written again
    state.global_step = 5
    callback.on_step_begin(args, state, control)
    expected = (random.getstate(), torch.random.get_rng_state())
    after_step_start = (random.random(), torch.rand(1).item())  # what the save must see: the step's start
    random.setstate(expected[0])
    torch.random.set_rng_state(expected[1])
    trainer.micro_batch()
    callback.on_substep_end(args, state, control)
    assert not control.should_training_stop and not trainer.saves  # no SIGTERM: the accumulation goes on

    trainer.micro_batch()
    stop.requested = True  # SIGTERM arrived during the second micro-batch of step 6
    callback.on_substep_end(args, state, control)
    assert control.should_training_stop
    assert trainer.saves == [(5, 21, 0.0, *after_step_start, None), "on_save"]  # step 5, its counts and random
    # state, the accumulated gradients dropped

    callback.on_save(args, state, control)
    trainer.saves.clear()
    callback.on_substep_end(args, state, control)  # asked again at the same step: nothing new to save
    assert not trainer.saves


def test_a_stop_before_anything_was_trained_saves_nothing(tmp_path):
    stop = Stop()
    state, control = TrainerState(global_step=0), TrainerControl()
    trainer = FakeTrainer(state)
    callback = StopAtNextMicroBatch(stop)
    callback.attach(trainer)
    args = SimpleNamespace(output_dir=str(tmp_path))
    callback.on_train_begin(args, state, control)
    callback.on_step_begin(args, state, control)
    trainer.micro_batch()
    stop.requested = True
    callback.on_substep_end(args, state, control)
    assert control.should_training_stop and not trainer.saves


def test_a_passed_over_folder_is_cleared_before_a_save_of_its_step_and_the_new_one_is_sealed(tmp_path):
    """The resume passed checkpoint-6 over and training reached step 6 again: none of the stale files may end
    up in the fresh checkpoint's manifest."""
    stale = checkpoint(tmp_path, 6, Markers())
    (stale / "rng_state_7.pth").write_bytes(b"from an earlier, larger job")
    state, control = TrainerState(global_step=6), TrainerControl(should_save=True)
    args = SimpleNamespace(output_dir=str(tmp_path))
    seal = MarkComplete(Markers())
    seal.on_step_end(args, state, control)
    assert not stale.exists()
    checkpoint(tmp_path, 6)  # what the Trainer writes
    seal.on_save(args, state, control)
    assert verify(stale) is None and "rng_state_7.pth" not in (stale / "manifest.json").read_text()


def test_a_job_resumes_only_checkpoints_of_its_own_training(tmp_path):
    from container.config import ConfigError
    from train.checkpoints import JOB_FILE, claim

    ours = {"base_model": "/m", "method": "sft+dpo", "data": {"sft": ["a1", "b1"], "dpo": ["c1", "d1"]}}
    claim(tmp_path, ours, write=False)  # another process of the instance: the first one records it
    assert not (tmp_path / JOB_FILE).exists()
    claim(tmp_path, ours, write=True)
    claim(tmp_path, ours, write=True)  # a restart of the same training: resumed
    assert json.loads((tmp_path / JOB_FILE).read_text()) == ours and not list(tmp_path.glob(".*.tmp"))
    other = {**ours, "data": {"sft": ["a2", "b1"], "dpo": ["c1", "d1"]}}
    with pytest.raises(ConfigError, match=r"checkpoints in .* are another training's \(data differ\)"):
        claim(tmp_path, other, write=True)
    with pytest.raises(ConfigError, match=r"\(base_model, method differ\)"):
        claim(tmp_path, {**ours, "base_model": "/n", "method": "dpo"}, write=False)
    (tmp_path / JOB_FILE).write_text("{cut")  # only a hand edit can do this: recorded anew
    claim(tmp_path, other, write=True)
    assert json.loads((tmp_path / JOB_FILE).read_text()) == other


def test_a_resumed_epoch_groups_by_length_in_the_order_the_interrupted_run_had():
    from train.recipes import SeededLengthSampler

    lengths = [random.Random(i).randint(5, 200) for i in range(64)]
    epoch = SimpleNamespace(now=0.0)  # the trainer's state.epoch: whole at an epoch's start, fractional within
    running = SeededLengthSampler(8, lengths, seed=42, epoch=lambda: int(epoch.now))
    orders = []
    for start in range(3):
        epoch.now = float(start)
        torch.manual_seed(1000 + start)  # whatever the global random state is then
        orders.append(list(running))
    epoch.now = 2.375  # a new process resuming mid-epoch 2 (state.epoch restored from the checkpoint)
    restarted = SeededLengthSampler(8, lengths, seed=42, epoch=lambda: int(epoch.now))
    assert list(restarted) == orders[2] and orders[0] != orders[1] != orders[2]
    assert sorted(orders[2]) == list(range(64))  # every example once per epoch


def test_a_restart_that_extracts_its_base_elsewhere_is_still_the_same_training(tmp_path):
    """A model.tar.gz base is extracted to a folder named after the tarball's time, which a restart's fresh
    download changes: the training is named by the base's content, not its path."""
    from train.config import TrainConfig
    from train.model import BaseModel
    from train.pipeline import training_identity

    first, restarted, other = (tmp_path / name for name in ("base-a", "base-b", "other"))
    for folder, weights in ((first, b"w" * 10), (restarted, b"w" * 10), (other, b"w" * 11)):
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(weights)
    data = {"sft": ([{"prompt": "p", "completion": "c"}], [])}

    def identity(folder):
        return training_identity(TrainConfig(), BaseModel(str(folder), None), data)

    assert identity(first) == identity(restarted) != identity(other)
    from train.instructions import Corpus, Teacher

    assert Teacher(str(first), None).name == Teacher(str(restarted), None).name != Teacher(str(other), None).name
    from train.documents import Document, Passage

    documents = [Document("a.md", (Passage("a.md", 0, "words " * 30),))]
    with_corpus = training_identity(TrainConfig(), BaseModel(str(first), None), {}, Corpus("documents", documents, []))
    assert set(with_corpus["data"]) == {"documents"}  # instructions=auto: the passages, not the rows written from them
    assert training_identity(TrainConfig(), BaseModel("/image/smollm2", "embedded"), data)["base_model"] == "embedded"
