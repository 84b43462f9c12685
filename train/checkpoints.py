"""Spot-safe checkpoints: SIGTERM saves at the next step boundary; restarts resume from the newest
complete checkpoint. SageMaker syncs /opt/ml/checkpoints to S3 and copies it back before a restart.

A checkpoint counts only once the Trainer has finished writing it: the `on_save` callback, which runs
after every file is written, drops a marker in it. Checkpoints without the marker (a kill mid-write)
are never resumed from and are deleted. A finished stage leaves `<stage>/final` with the same marker.

Every instance of a job syncs its checkpoint folder to the one S3 prefix, and gets all of it back on a
restart. So with several instances each writes under its own host name (`<host>/<stage>/...`: no file of
one overwrites another's), and a checkpoint is resumed from only when every host's copy of it is
complete: all instances then resume from the same step.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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
    def on_save(self, args, state, control, **kwargs):
        if state.is_local_process_zero:  # every instance writes (and resumes from) its own checkpoints
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / COMPLETE_MARKER).touch()
        return control


def checkpoint_roots(checkpoints_dir: Path, current_host: str, hosts: tuple[str, ...]) -> tuple[Path, list[Path]]:
    """This instance's checkpoint folder, and every instance's (this one's included)."""
    if len(hosts) == 1:
        return checkpoints_dir, [checkpoints_dir]
    return checkpoints_dir / current_host, [checkpoints_dir / host for host in hosts]


def latest_checkpoint(stage_dir: Path, peer_stage_dirs: list[Path] = ()) -> Path | None:
    """The newest checkpoint-N under `stage_dir` that is complete there and in every peer's stage folder;
    this instance's incomplete ones are removed (never another instance's)."""
    steps = _complete_steps(stage_dir, remove_incomplete=True)
    for peer in peer_stage_dirs:
        if peer != stage_dir:
            steps &= _complete_steps(peer, remove_incomplete=False)
    return stage_dir / f"checkpoint-{max(steps)}" if steps else None


def _complete_steps(stage_dir: Path, remove_incomplete: bool) -> set[int]:
    steps = set()
    for folder in sorted(stage_dir.glob("checkpoint-*")):
        match = _CHECKPOINT.match(folder.name)
        if not match or not folder.is_dir():
            continue
        if (folder / COMPLETE_MARKER).is_file():
            steps.add(int(match.group(1)))
        elif remove_incomplete:
            log.warning("removing incomplete checkpoint %s (the job stopped while writing it)", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return steps


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def mark_complete(folder: Path) -> None:
    (folder / COMPLETE_MARKER).touch()
