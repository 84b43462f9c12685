"""Checkpoints a restart can trust. SageMaker uploads /opt/ml/checkpoints to S3 file by file in the background
and copies the prefix back before a restart, so after a spot kill S3 can hold a checkpoint with a file missing,
or one uploaded while it was still being written (truncated). So a checkpoint proves itself whole before use.

Sealing. Once every rank has written its files (`on_save`, after a barrier), the first process of each instance
writes a manifest, every file's relative path, size and SHA-256, as a temporary file renamed into place, then
the `.complete` marker. A finished stage's `<stage>/final` is sealed the same way (`mark_complete`).

Resuming. The newest checkpoint whose markers and manifests are all there and whose files match them (sizes
first, then hashes) is resumed from; each newer one is passed over with the reason logged. One that fails is
never loaded (DeepSpeed resumes by unpickling) and never deleted on the spot: it may be the only copy of
something useful, and S3 mirrors deletions. It is left in place and goes like any old checkpoint, through the
Trainer's save_total_limit rotation, or when the resumed run reaches its step again and writes a fresh
checkpoint there (the stale folder is cleared first, so none of its files lands in the new manifest). A
checkpoint without its marker (cut short while being written) is removed, as before, in a one-instance job.

Instances. Every instance syncs its checkpoint folder to the one S3 prefix and gets all of it back on a restart:
that union is what DeepSpeed needs (each rank's shards, and rank 0's `latest`, in one folder). So each instance
writes its own marker (`.complete-<host>`) and its own manifest (`manifest-<host>.json`, the files it wrote),
and a checkpoint counts only with every host's. Files several instances write under one name (the weights, the
trainer state) hold one instance's copy in the union: such a file verifies when it matches any instance's entry
for it. The first process decides where to resume and tells the others (`on_first_process`), so every rank of
every instance resumes from the same step. A resume never deletes another instance's files; a stale folder is
cleared (on every instance, its own copy of the union) only when all of them are about to write that step anew.

Whose. A job resumes only checkpoints of the same training: `claim` keeps what they were trained on (the base
model and its commit, the method, the adapter's shape, a digest of every stage's rows) in `job.json` at the
checkpoints' root, and a job that finds another there is refused before it trains, rather than skipping a stage
or resuming a step of someone else's work. A restart, or a new job given the same checkpoint URI to go on with
the same training, finds its own and resumes; other hyperparameters (steps, learning rate) may change.

Stopping. SIGTERM (train/stop.py) stops training at the next micro-batch: `StopAtNextMicroBatch`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, TypeVar

import numpy as np
import torch
from transformers import TrainerCallback

from container.config import ConfigError
from train.config import JOB_FILE
from train.stop import Stop

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
MANIFEST_PREFIX = "manifest"  # manifest.json, or manifest-<host>.json with several instances
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_HASHING_THREADS = 8  # hashlib releases the GIL: files are hashed in parallel (DeepSpeed writes one per rank)

T = TypeVar("T")


@dataclass(frozen=True)
class Markers:
    """Completeness markers and manifests: `.complete` and `manifest.json` for a one-instance job,
    `.complete-<host>` and `manifest-<host>.json` per instance otherwise."""

    own: str = COMPLETE_MARKER
    every: tuple[str, ...] = (COMPLETE_MARKER,)

    @classmethod
    def for_hosts(cls, current_host: str, hosts: tuple[str, ...]) -> "Markers":
        if len(hosts) == 1:
            return cls()
        return cls(f"{COMPLETE_MARKER}-{current_host}", tuple(f"{COMPLETE_MARKER}-{host}" for host in hosts))

    @property
    def own_manifest(self) -> str:
        return manifest_name(self.own)

    @property
    def manifests(self) -> tuple[str, ...]:
        return tuple(manifest_name(marker) for marker in self.every)

    def complete(self, folder: Path) -> bool:
        """Every instance finished writing its part (its marker is there); whether the files are whole is verify's."""
        return all((folder / marker).is_file() for marker in self.every)


def manifest_name(marker: str) -> str:
    """`.complete` -> `manifest.json`, `.complete-algo-1` -> `manifest-algo-1.json`."""
    return f"{MANIFEST_PREFIX}{marker[len(COMPLETE_MARKER):]}.json"


def _is_seal(name: str) -> bool:
    """Markers and manifests (any instance's, and a manifest being written): not part of what they describe."""
    return name.startswith(COMPLETE_MARKER) or (name.startswith(MANIFEST_PREFIX) and name.endswith((".json", ".tmp")))


# ---- manifests ----

def write_manifest(folder: Path, name: str) -> None:
    """Every file under `folder` (markers and manifests aside) with its size and SHA-256, written whole: a
    temporary file, flushed to disk, renamed into place."""
    files = sorted(path for path in folder.rglob("*")
                   if path.is_file() and not (path.parent == folder and _is_seal(path.name)))
    sizes = [path.stat().st_size for path in files]
    entries = {path.relative_to(folder).as_posix(): {"size": size, "sha256": digest}
               for path, size, digest in zip(files, sizes, _sha256_all(files))}
    partial = folder / f"{name}.tmp"
    with open(partial, "w", encoding="utf-8") as out:
        json.dump({"format": 1, "files": entries}, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, folder / name)


def mark_complete(folder: Path, markers: Markers = Markers()) -> None:
    """Seal `folder`: this instance's manifest, then its marker."""
    write_manifest(folder, markers.own_manifest)
    (folder / markers.own).touch()


def verify(folder: Path, markers: Markers = Markers()) -> str | None:
    """None when `folder` is whole: every instance's marker and manifest are there, and every file a manifest
    lists has a size and SHA-256 that one of them records. Otherwise the first problem found, in words."""
    for name in (*markers.every, *markers.manifests):
        if not (folder / name).is_file():
            return f"{name} is missing (writing it was cut short, or it did not reach S3)"
    expected: dict[str, set[tuple[int, str]]] = {}
    for name in markers.manifests:
        try:
            for path, entry in json.loads((folder / name).read_text(encoding="utf-8"))["files"].items():
                expected.setdefault(path, set()).add((int(entry["size"]), str(entry["sha256"])))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:  # 1e400: inf
            return f"{name} is unreadable ({type(e).__name__}: {e})"
    paths = sorted(expected)
    for path in paths:  # sizes first: a truncated file is found without reading anything
        problem = _size_problem(folder, path, expected[path])
        if problem:
            return problem
    for path, digest in zip(paths, _sha256_all(folder / path for path in paths)):
        if digest not in {sha for _, sha in expected[path]}:
            return f"{path} does not match its SHA-256 in the manifest (same size, other bytes)"
    return None


def _size_problem(folder: Path, path: str, entries: set[tuple[int, str]]) -> str | None:
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts:
        return f"the manifest names {path!r}, which is outside the checkpoint"
    file = folder / relative
    if not file.is_file():
        return f"{path} is missing"
    size = file.stat().st_size
    recorded = sorted({expected for expected, _ in entries})
    if size not in recorded:
        return f"{path} is {size} bytes, the manifest says {' or '.join(map(str, recorded))}"
    return None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha256_all(paths: Iterable[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(_HASHING_THREADS, os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, paths))


# ---- choosing what to resume from ----

def saved_checkpoints(stage_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder, newest first."""
    found = [(int(match.group(1)), folder) for folder in stage_dir.glob("checkpoint-*")
             if (match := _CHECKPOINT.match(folder.name)) and folder.is_dir()]
    return sorted(found, reverse=True)


def resume_checkpoint(stage_dir: Path, markers: Markers = Markers()) -> Path | None:
    """The newest checkpoint-N under `stage_dir` that every instance completed and that verifies, or None; logs
    each one passed over and why. One missing a marker is removed when it is this instance's alone (a
    one-instance job); one that fails verification is kept and passed over."""
    passed_over = []
    for _, folder in saved_checkpoints(stage_dir):
        if not markers.complete(folder):
            if len(markers.every) == 1:
                log.warning("removing incomplete checkpoint %s (the job stopped while writing it)", folder)
                shutil.rmtree(folder, ignore_errors=True)
            else:
                log.warning("passing over %s: not every instance finished writing it", folder)
            continue
        problem = verify(folder, markers)
        if problem is None:
            if passed_over:
                log.warning("resuming from %s, the newest checkpoint that verifies", folder.name)
            return folder
        passed_over.append(folder.name)
        log.warning("%s fails verification: %s; passing over it (kept, never loaded)", folder.name, problem)
    if passed_over:
        log.warning("no checkpoint of %s verifies (%s passed over): starting %s over from step 0", stage_dir.name,
                    ", ".join(passed_over), stage_dir.name)
    return None


def newest_saved(stage_dir: Path, markers: Markers = Markers()) -> Path | None:
    """The newest checkpoint this instance finished writing (its own marker), not verified: what a stopped job
    names in its failure file, at no cost inside SageMaker's 120 s."""
    return next((folder for _, folder in saved_checkpoints(stage_dir) if (folder / markers.own).is_file()), None)


def is_complete(folder: Path, markers: Markers = Markers()) -> bool:
    """Whether a finished stage's model (`<stage>/final`) can be trusted; says why not when it is there but fails."""
    absent = "absent"
    problem = on_first_process(lambda: verify(folder, markers) if folder.is_dir() else absent)
    if problem not in (None, absent):
        log.warning("%s fails verification: %s; training that stage again (kept until it is replaced)", folder,
                    problem)
    return problem is None


def claim(checkpoints_dir: Path, training: dict, write: bool) -> None:
    """Refuse checkpoints of another training (see Whose, above); `write`: this process records `training` when
    the folder has none (the first process of each instance)."""
    path = checkpoints_dir / JOB_FILE
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        found = None
    except ValueError:  # written whole by rename, so only a hand-edited file: it says nothing to trust
        log.warning("%s is not JSON: recording this training in its place", path)
        found = None
    if isinstance(found, dict) and found != training:
        differ = sorted(key for key in training.keys() | found.keys() if training.get(key) != found.get(key))
        raise ConfigError(f"the checkpoints in {checkpoints_dir} are another training's ({', '.join(differ)} "
                          "differ), which this job would resume as its own: give it a new checkpoint S3 URI (or "
                          "empty that one)")
    if found is None and write:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{JOB_FILE}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(training, sort_keys=True, indent=1) + "\n", encoding="utf-8")
        staging.replace(path)


def on_first_process(decide: Callable[[], T]) -> T:
    """`decide()` on the first process, its answer given to every process when several train: every rank of every
    instance acts on one decision, and only one process reads the files or removes a folder."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return decide()
    answer = [decide() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(answer, src=0)
    return answer[0]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _checkpoint_folder(args, state) -> Path:
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def clear_stale(args, state) -> None:
    """Before the Trainer writes checkpoint-N: a folder already there by that name is one a resume passed over
    (it resumed from an older step). It is replaced by the fresh checkpoint of the same step, removed first so
    that none of its files lands in the new manifest."""
    folder = _checkpoint_folder(args, state)
    if state.is_local_process_zero and folder.is_dir():
        log.warning("replacing %s, which the resume passed over, with a fresh checkpoint of the same step", folder)
        shutil.rmtree(folder)
    _barrier()  # no rank writes into the folder before it is gone


# ---- callbacks ----

class MarkComplete(TrainerCallback):
    """Seals each checkpoint once every rank has written its files (the Trainer writes none after `on_save`,
    but ranks reach it at their own pace); clears a stale folder before a save reuses its name."""

    def __init__(self, markers: Markers = Markers()):
        self.markers = markers

    def on_train_begin(self, args, state, control, **kwargs):
        """A resumed run's best checkpoint (load_best_model_at_end loads it at the end) must verify too."""
        best = state.best_model_checkpoint
        problem = on_first_process(lambda: verify(Path(best), self.markers)) if best else None
        if problem:
            log.warning("the best checkpoint %s fails verification: %s; it will not be loaded", best, problem)
            state.best_model_checkpoint = state.best_global_step = None
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:  # decided by now: this callback comes after the ones that set it
            clear_stale(args, state)
        return control

    def on_save(self, args, state, control, **kwargs):
        _barrier()
        folder = _checkpoint_folder(args, state)
        if state.is_local_process_zero and folder.is_dir():  # every instance writes (and resumes from) its own
            mark_complete(folder, self.markers)
        return control


def _rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


@dataclass(frozen=True)
class StepStart:
    """What a micro-batch changes besides the gradients, as it was when the optimizer step began."""

    rng: dict
    tokens_seen: int
    flos: float

    @classmethod
    def capture(cls, trainer, state) -> "StepStart":
        return cls(_rng_states(), state.num_input_tokens_seen, trainer.current_flos)

    def restore(self, trainer, state) -> None:
        _set_rng_states(self.rng)
        state.num_input_tokens_seen = self.tokens_seen
        trainer.current_flos = self.flos


class StopAtNextMicroBatch(TrainerCallback):
    """SIGTERM stops training at the next micro-batch, not at the end of the optimizer step: with long gradient
    accumulation one step can outlast the 120 s SageMaker allows. After every micro-batch all ranks agree
    whether to stop (train.stop.Stop.agree, an all-reduce): the same answer at the same micro-batch everywhere.

    At a step's end the Trainer saves that step's checkpoint itself. Mid-step, the weights and the optimizer are
    still those of the last optimizer step N: the random states and the token and FLOP counts are put back as
    they were when step N+1 began, the accumulated gradients are dropped, and checkpoint-N is saved (through
    Trainer._save_checkpoint, as transformers' own JIT checkpoint does) and sealed. A resume skips N x
    gradient_accumulation_steps batches and redoes step N+1 whole: the same samples, the same random state as
    a run never stopped."""

    def __init__(self, stop: Stop):
        self.stop = stop
        self.trainer = None  # attach(): a mid-step save needs the Trainer
        self.saved_step = 0
        self.step_start: StepStart | None = None

    def attach(self, trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.saved_step = state.global_step  # a resumed run's checkpoint is already there: never rewritten
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = StepStart.capture(self.trainer, state)
        return control

    def on_substep_end(self, args, state, control, **kwargs):
        if self.stop.agree():
            self.step_start.restore(self.trainer, state)
            self.trainer.model.zero_grad(set_to_none=True)  # the unfinished accumulation: never stepped, never saved
            control.should_training_stop = True
            if state.global_step != self.saved_step:  # else nothing was trained since the last (or no) checkpoint
                clear_stale(args, state)
                self.trainer._save_checkpoint(self.trainer.model_wrapped, trial=None)
                self.trainer.callback_handler.on_save(args, state, control)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.agree():
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.saved_step = state.global_step
        return control
