"""SIGTERM, from the first instruction of `train` to its last: what a spot interruption or StopTrainingJob
sends, 120 s before SIGKILL.

Inside a stage's training loop the signal only sets a flag: after the next micro-batch every rank agrees
(an all-reduce) to save a checkpoint and stop (train/checkpoints.py: StopAtNextMicroBatch), so no rank is left
waiting in a collective, and a long gradient accumulation does not hold the stop back. Everywhere else
(downloading or extracting the base, loading, evaluating, saving, merging, exporting) there is no
checkpoint to write, so the handler raises TrainingInterrupted at once and the job ends with its failure
file and exit 143; what was finished (stage models, checkpoints) is kept for the rerun.
"""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from typing import Iterator

from train.errors import TrainingInterrupted

log = logging.getLogger(__name__)


class Stop:
    def __init__(self):
        self.requested = False
        self._phase = "starting"
        # True inside a training loop (stop after the next micro-batch), and before main's first phase, where
        # no boundary is in place yet to report it: that phase raises it.
        self._deferred = True

    def install(self) -> "Stop":
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        first = not self.requested
        self.requested = True
        if self._deferred:
            if first:
                log.warning("SIGTERM received: saving a checkpoint after the current micro-batch, then exiting")
            return
        raise self.interrupted()

    def interrupted(self) -> TrainingInterrupted:
        return TrainingInterrupted(f"training stopped by SIGTERM while {self._phase}; start the job again to resume "
                                   "(finished stages and complete checkpoints are kept)")

    @contextmanager
    def phase(self, name: str, deferred: bool = False) -> Iterator[None]:
        """Name what the job is doing (the failure file says it); deferred: a training loop that stops after
        its next micro-batch instead of at once."""
        previous = self._phase, self._deferred
        self._phase, self._deferred = name, deferred
        try:
            if self.requested and not deferred:  # it came while the signal was deferred: stop before starting
                raise self.interrupted()
            yield
        finally:
            self._phase, self._deferred = previous

    def agree(self) -> bool:
        """Whether any rank was asked to stop, the same answer on every rank (an all-reduce when several
        processes train): one rank stopping alone would leave the others blocked in a collective."""
        import torch

        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.requested
        device = torch.cuda.current_device() if torch.distributed.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if self.requested else 0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested
