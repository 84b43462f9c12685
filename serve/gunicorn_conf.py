"""gunicorn settings, from ServeConfig. Threaded workers: HTTP threads wait on the engine thread."""

from serve.config import ServeConfig

_config = ServeConfig.from_env()

bind = f"0.0.0.0:{_config.port}"
workers = _config.workers or 1
worker_class = "gthread"
threads = _config.threads  # max_concurrent_requests + a few kept free for /ping
timeout = _config.timeout + 30  # a worker is only killed after its requests could have timed out
graceful_timeout = 25  # SageMaker sends SIGKILL 30 s after SIGTERM
keepalive = 75
errorlog = "-"
loglevel = "info"
control_socket_disable = True  # gunicorn 27's admin socket: unused, and one path per user would clash
