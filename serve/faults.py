"""Serve's fault policy, in one place: what a failure during generation ends.

    request   anything else (a bad grammar vLLM could not compile, a predict_fn bug): that request gets
              a 424 and the worker carries on
    memory    out of memory: that request gets a 503 to retry, and the worker lowers how many requests it
              admits at once (by half, down to one), so the next ones fit; it climbs back as requests
              succeed (serve/admission.py)
    fatal     the device or the engine is poisoned (a CUDA error other than out-of-memory: a device-side
              assert, an illegal memory access, an ECC or NCCL fault; or vLLM's engine process gone): every
              request in flight gets a 500 at once, /ping fails, and the worker exits so that gunicorn
              starts a fresh one (and SageMaker replaces an instance whose /ping keeps failing)

With vLLM a CUDA error kills its engine-core process, so on that path it arrives as EngineDeadError (or
the engine found errored by the watch in serve/engine.py); a custom predict_fn raises torch's errors itself.
"""

from __future__ import annotations

from serve.errors import GenerationError, ServeError

REQUEST, MEMORY, FATAL = "request", "memory", "fatal"
WORKER_BOOT_ERROR = 3  # a worker whose model fails to load exits with this: gunicorn then stops the server

# Classified by the exception's type, never its text: a predict_fn bug whose message quotes "CUDA error"
# is that request's failure, not the device's. Names, looked up along the type's bases, so that neither
# torch nor vLLM is imported here: torch's OutOfMemoryError and AcceleratorError (what a CUDA error raises
# since torch 2.8), torch.distributed's DistBackendError (NCCL), vLLM's EngineDeadError.
MEMORY_ERRORS = frozenset({"MemoryError", "OutOfMemoryError"})
FATAL_ERRORS = frozenset({"AcceleratorError", "DistBackendError", "EngineDeadError"})


class OutOfMemory(ServeError):
    status, error_type = 503, "out_of_memory"


class EngineFailed(ServeError):
    status, error_type = 500, "engine"


def classify(error: BaseException) -> str:
    names = {kind.__name__ for kind in type(error).__mro__}
    if names & MEMORY_ERRORS:
        return MEMORY
    if names & FATAL_ERRORS:
        return FATAL
    return REQUEST


def request_error(kind: str, what: str, error: BaseException) -> ServeError:
    """The error the failing request is answered with."""
    detail = f"{what}: {type(error).__name__}: {error}"
    if kind == MEMORY:
        return OutOfMemory(f"{detail} (the server now admits fewer requests at once: retry)")
    if kind == FATAL:
        return EngineFailed(f"{detail} (the device or the engine cannot be trusted: this worker restarts)")
    return GenerationError(detail)
