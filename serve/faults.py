"""Serve's fault policy, in one place: what a failure during generation ends.

    request   anything else (a bad grammar vLLM could not compile, a predict_fn bug): that request gets
              a 424 and the worker carries on
    memory    out of memory: that request gets a 503 to retry, and the worker lowers how many requests it
              admits at once (by half, down to one), so the next ones fit
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

# What CUDA, its libraries and NCCL put in the messages of errors after which the device cannot be trusted.
DEVICE_FAULTS = ("cuda error", "device-side assert", "illegal memory access", "illegal instruction",
                 "misaligned address", "unspecified launch failure", "ecc error", "uncorrectable", "nccl error",
                 "ncclsystemerror", "ncclunhandledcudaerror", "cublas_status", "cudnn_status", "cuda driver error")


class OutOfMemory(ServeError):
    status, error_type = 503, "out_of_memory"


class EngineFailed(ServeError):
    status, error_type = 500, "engine"


def classify(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".lower()
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or "out of memory" in text:
        return MEMORY
    if type(error).__name__ == "EngineDeadError" or any(fault in text for fault in DEVICE_FAULTS):
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
