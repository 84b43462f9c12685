"""gunicorn settings, from ServeConfig. Threaded workers: HTTP threads wait on the engine loop's thread.
Worker count and GPU placement come from serve/placement.py."""

import os

from serve.config import ENGINE_COPIES_ENV, ServeConfig
from serve.placement import Placement, free_gpu, gpus_present, model_bytes, plan

_config = ServeConfig.from_env()
_gpus, _gpu_bytes = gpus_present()
if _config.num_shard:  # NUM_SHARD set: one engine sharded over that many GPUs, as TGI does
    _placement = Placement(_config.workers or 1, pin_gpus=False, span_gpus=False)
else:
    _placement = plan(_config.workers, _gpus, _gpu_bytes, model_bytes(_config.model_dir))

bind = f"0.0.0.0:{_config.port}"
workers = _placement.workers
os.environ[ENGINE_COPIES_ENV] = str(workers)  # the workers' ServeConfig: batch transform's concurrency
worker_class = "gthread"
threads = _config.threads  # max_concurrent_requests + a few kept free for /ping
timeout = max(_config.timeout, _config.stream_timeout) + 30  # only after its requests could have timed out
graceful_timeout = 25  # SageMaker sends SIGKILL 30 s after SIGTERM
keepalive = 75
errorlog = "-"
loglevel = "info"
control_socket_disable = True  # gunicorn 27's admin socket: unused, and one path per user would clash


def pre_fork(server, worker):
    if _placement.pin_gpus:
        worker.gpu = free_gpu({getattr(w, "gpu", -1) for w in server.WORKERS.values()}, _gpus)


def post_fork(server, worker):
    if _placement.pin_gpus:  # the device id among those this container may use
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[worker.gpu] if worker.gpu < len(visible) else str(worker.gpu)
        server.log.info("worker %s serves GPU %s", worker.pid, worker.gpu)
    if _placement.span_gpus and not _config.num_shard:  # vLLM's tensor parallelism over every GPU
        os.environ["NUM_SHARD"] = str(_gpus)
        server.log.info("worker %s shards the model over %d GPUs", worker.pid, _gpus)


def worker_exit(server, worker):
    """Stop vLLM's engine processes with the worker (SIGTERM drain, or a worker gunicorn replaces)."""
    engine = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("engine")
    if engine is not None:
        engine.shutdown()
