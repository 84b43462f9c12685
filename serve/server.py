"""gunicorn, run in-process with the Startup computed once: its settings, its fork hooks, and what each
worker builds (its engine, the adapters it knows, the Flask app). Threaded workers (serve/worker.py: gthread,
with each request read whole before a thread takes it): HTTP threads wait on the engine's thread."""

from __future__ import annotations

import logging
import os
import signal
import tempfile

from gunicorn.app.base import BaseApplication

from serve.adapters import Adapters
from serve.app import create_app
from serve.placement import free_gpu
from serve.readiness import ReadyBoard
from serve.startup import Startup
from serve.worker import BufferingWorker

GRACEFUL_SECONDS = 25  # SageMaker sends SIGKILL 30 s after SIGTERM
KEEPALIVE_SECONDS = 75
# gthread's timeout is its main loop's heartbeat, not a request's limit (requests run in the thread pool): the
# loop that answers /ping, silent this long, is stuck, and the master replaces the worker. It was the longest
# request timeout plus 30 s, which left a stuck worker up to an hour on an async or batch endpoint.
HEARTBEAT_TIMEOUT_SECONDS = 120
# A worker's heartbeat to the master is a file whose time it sets at each turn of its loop: in memory, not on
# the container's disk (a metadata write each time; the worker's main thread spent a quarter of its time there).
HEARTBEAT_DIR = "/dev/shm"


class Server(BaseApplication):
    def __init__(self, startup: Startup):
        self.startup = startup
        self.forked: list = []  # the workers gunicorn forked (in the master)
        super().__init__()

    def load_config(self) -> None:
        config = self.startup.config
        BufferingWorker.ready_board = ReadyBoard.create(HEARTBEAT_DIR if os.path.isdir(HEARTBEAT_DIR)
                                                        else tempfile.gettempdir())
        settings = {
            "proc_name": "llm-twin-serve",
            "bind": f"0.0.0.0:{config.port}",
            "workers": self.startup.placement.workers,
            "worker_class": BufferingWorker,  # a half-sent request holds no thread (issue #21)
            "threads": config.threads,  # max_concurrent_requests + a few kept free for /ping
            "timeout": HEARTBEAT_TIMEOUT_SECONDS,
            "graceful_timeout": GRACEFUL_SECONDS,
            "keepalive": KEEPALIVE_SECONDS,
            "worker_tmp_dir": HEARTBEAT_DIR if os.path.isdir(HEARTBEAT_DIR) else None,
            "errorlog": "-",
            "loglevel": "info",
            "control_socket_disable": True,  # gunicorn 27's admin socket: unused, and one path per user would clash
            "pre_fork": self.pre_fork,
            "post_fork": self.post_fork,
            "child_exit": self.child_exit,
            "on_exit": self.on_exit,
            "worker_exit": worker_exit,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):
        """In each worker, once: start its engine (loading in the engine's thread; /ping says 503 until it is
        warm) and answer with the app."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        startup = self.startup
        adapters = Adapters(startup.fixed_adapters, startup.adapter_registry, startup.lora_rank,
                            startup.config.adapter_source_root)
        if startup.predicts:
            from serve.predict import PredictEngine

            engine = PredictEngine(startup.config, startup.spec, startup.custom)
        else:
            from serve.engine import VllmEngine

            engine = VllmEngine(startup.config, startup.spec, adapters, startup.lora_rank)
        engine.start()
        return create_app(engine, adapters, startup)

    def pre_fork(self, server, worker) -> None:
        self.forked.append(worker)  # its pid is set once forked: its process group is killed when gunicorn exits
        if self.startup.placement.pin_gpus:
            worker.gpu = free_gpu({getattr(w, "gpu", -1) for w in server.WORKERS.values()}, self.startup.gpus)

    def post_fork(self, server, worker) -> None:
        os.setpgid(0, 0)  # a group of its own, which vLLM's engine processes join: see child_exit
        if self.startup.placement.pin_gpus:  # the device id among those this container may use
            visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[worker.gpu] if worker.gpu < len(visible) else str(worker.gpu)
            server.log.info("worker %s serves GPU %s", worker.pid, worker.gpu)
        elif self.startup.config.num_shard > 1:
            server.log.info("worker %s shards the model over %d GPUs", worker.pid, self.startup.config.num_shard)

    def child_exit(self, server, worker) -> None:
        """A worker exited (in the master): vLLM's engine processes, which hold the model and its KV cache in
        memory (a GPU's too), die with it. A worker shuts its engine down when it stops (worker_exit), but one
        killed (the OOM killer, gunicorn's timeout) cannot, and its engine processes would outlive it, holding
        the memory the next worker needs. They are in the worker's process group (post_fork)."""
        kill_group(worker.pid)
        self.forked.remove(worker)
        if isinstance(worker.pid, int):
            BufferingWorker.ready_board.mark(worker.pid, False)  # killed, it could not say so itself

    def on_exit(self, server) -> None:
        """gunicorn stops: it SIGKILLs the workers still there after GRACEFUL_SECONDS and may exit before it
        reaps them, so their engine processes are killed here."""
        for worker in self.forked:
            kill_group(worker.pid)
        BufferingWorker.ready_board.remove()


def kill_group(pgid: int | str) -> None:
    if not isinstance(pgid, int):  # "[booting]": gunicorn's worker before its fork
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # nothing left in it
        pass


def worker_exit(server, worker) -> None:
    """Stop vLLM's engine processes with the worker (SIGTERM drain, or a worker gunicorn replaces)."""
    if worker.ready_board is not None:
        worker.ready_board.mark(worker.pid, False)
    engine = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("engine")
    if engine is not None:
        engine.shutdown()
