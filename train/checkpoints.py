"""Spot-safe checkpoints: SIGTERM saves at the next step boundary; restarts resume from the newest
complete checkpoint. SageMaker syncs /opt/ml/checkpoints to S3 and copies it back before a restart.

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
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

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


class StopOnSignal(TrainerCallback):
    """Installs a SIGTERM handler; at the next step boundary asks the Trainer to save and stop."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if not self.requested:
            log.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting")
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if self._anyone_requested():
            control.should_save = True
            control.should_training_stop = True
        return control

    def _anyone_requested(self) -> bool:
        """Every rank stops at the same step: a rank stopping alone would leave the others blocked in a
        collective (and under ZeRO-3 the checkpoint itself is a collective)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.requested
        device = torch.cuda.current_device() if torch.distributed.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if self.requested else 0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested


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
