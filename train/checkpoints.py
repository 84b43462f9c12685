"""Spot-safe checkpoints: SIGTERM saves at the next step boundary (train/stop.py); restarts resume from
the newest complete checkpoint. SageMaker syncs /opt/ml/checkpoints to S3 and copies it back before a restart.

A checkpoint counts only once the Trainer has finished writing it: the `on_save` callback, which runs
after every file is written, drops a marker in it. Checkpoints without the marker (a kill mid-write)
are never resumed from and are deleted. A finished stage leaves `<stage>/final` with the same marker.

Every instance of a job syncs its checkpoint folder to the one S3 prefix and gets all of it back on a
restart: that union is what DeepSpeed needs (each rank's shards, and rank 0's `latest`, in one folder).
So with several instances each marks its own part complete (`.complete-<host>`), and a checkpoint counts
only with every host's marker: all instances then resume from the same step. Another instance's files
are never deleted.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from train.stop import Stop

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Markers:
    """Completeness markers: `.complete` for a one-instance job, `.complete-<host>` per instance otherwise."""

    own: str = COMPLETE_MARKER
    every: tuple[str, ...] = (COMPLETE_MARKER,)

    @classmethod
    def for_hosts(cls, current_host: str, hosts: tuple[str, ...]) -> "Markers":
        if len(hosts) == 1:
            return cls()
        return cls(f"{COMPLETE_MARKER}-{current_host}", tuple(f"{COMPLETE_MARKER}-{host}" for host in hosts))

    def complete(self, folder: Path) -> bool:
        return all((folder / marker).is_file() for marker in self.every)


class StopAtStepBoundary(TrainerCallback):
    """At every step's end, every rank agrees whether a SIGTERM arrived (train.stop.Stop.agree); if one did,
    the Trainer saves a checkpoint and stops, the same step on every rank."""

    def __init__(self, stop: Stop):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.agree():
            control.should_save = True
            control.should_training_stop = True
        return control


class MarkComplete(TrainerCallback):
    def __init__(self, markers: Markers = Markers()):
        self.markers = markers

    def on_save(self, args, state, control, **kwargs):
        if state.is_local_process_zero:  # every instance writes (and resumes from) its own checkpoints
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / self.markers.own).touch()
        return control


def latest_checkpoint(stage_dir: Path, markers: Markers = Markers()) -> Path | None:
    """The newest checkpoint-N under `stage_dir` that every instance completed. An incomplete one is
    removed when it is this instance's alone (a one-instance job); with several, it is only passed over."""
    complete = []
    for folder in sorted(stage_dir.glob("checkpoint-*")):
        match = _CHECKPOINT.match(folder.name)
        if not match or not folder.is_dir():
            continue
        if markers.complete(folder):
            complete.append((int(match.group(1)), folder))
        elif len(markers.every) == 1:
            log.warning("removing incomplete checkpoint %s (the job stopped while writing it)", folder)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            log.warning("passing over %s: not every instance finished writing it", folder)
    return max(complete)[1] if complete else None


def is_complete(folder: Path, markers: Markers = Markers()) -> bool:
    return markers.complete(folder)


def mark_complete(folder: Path, markers: Markers = Markers()) -> None:
    (folder / markers.own).touch()
