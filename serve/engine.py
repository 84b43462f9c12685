"""The engine: one thread per worker that owns the model, takes requests from a queue and generates.

HTTP threads submit requests and wait on a future; only the engine thread touches the model and the
tokenizer, so there are no locks around them and /ping never waits behind a generation. The engine
thread imports torch and loads the model itself, so the HTTP side answers /ping (503) within a second
of starting. Requests run one at a time for now; the queue is where batching across requests plugs in.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import Future

from container.model_dir import ServingSpec
from serve.config import ServeConfig
from serve.errors import GenerationError, ServeError
from serve.schemas import GenerateParams, GenerateRequest, GenerateResult

log = logging.getLogger(__name__)

WORKER_BOOT_ERROR = 3  # gunicorn stops the whole server when a worker exits with this code


class Engine:
    def __init__(self, config: ServeConfig, spec: ServingSpec):
        self.config = config
        self.spec = spec
        self._requests: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        self._thread.start()

    def generate(self, request: GenerateRequest) -> GenerateResult:
        future: Future = Future()
        self._requests.put((request, future))
        try:
            return future.result(timeout=self.config.timeout)
        except TimeoutError:
            future.cancel()  # still queued: the engine skips it instead of generating for nobody
            raise

    def _run(self) -> None:
        try:
            from serve.generator import Generator  # torch loads here, in the engine thread

            generator = Generator(self.config, self.spec)
            generator.generate(GenerateRequest("Hello", GenerateParams(max_new_tokens=2)))  # warm-up
        except Exception:
            log.exception("loading the model from %s failed", self.config.model_dir)
            os._exit(WORKER_BOOT_ERROR)
        self._ready.set()
        log.info("model ready on %s (%s)", generator.device, generator.dtype)
        while True:
            request, future = self._requests.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(generator.generate(request))
            except ServeError as e:
                future.set_exception(e)
            except Exception as e:  # a failed generation fails its request, never the engine
                log.exception("generation failed")
                future.set_exception(GenerationError(f"Request failed during generation: {type(e).__name__}: {e}"))
