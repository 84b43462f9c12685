"""Which workers of one server have a warm engine, so that a worker still loading leaves the traffic to them.

gunicorn's workers accept from one listening socket. A worker whose engine is loading answers 503 ("model is
loading") to what it accepts: right while no worker is ready (SageMaker's /ping then says the instance is not
ready), wrong while another one is, as after one worker restarts (a fatal fault, the OOM killer) on an
instance with a worker per GPU: its share of the requests, and of SageMaker's pings, would fail for the
minutes it takes to load. So a loading worker stops accepting while any other is ready, and the kernel hands
every connection to the ready ones.

The board is a folder in memory (/dev/shm) with an empty file per ready worker, named by its pid: each worker
marks itself, its exit unmarks it, and the master unmarks a worker that was killed (serve/server.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class ReadyBoard:
    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def create(cls, parent: str) -> "ReadyBoard":
        """In the master, before the workers fork: a fresh folder of its own."""
        folder = Path(parent) / f"llm-twin-ready-{os.getpid()}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return cls(folder)

    def mark(self, pid: int, ready: bool) -> None:
        path = self.folder / str(pid)
        if ready:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def others_ready(self, pid: int) -> bool:
        try:
            return any(name != str(pid) for name in os.listdir(self.folder))
        except FileNotFoundError:  # the server is stopping
            return False

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
