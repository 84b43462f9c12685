"""The image's ENTRYPOINT: `llm-twin train|serve|<command>`.

SageMaker runs `docker run IMAGE train` for training jobs and `docker run IMAGE serve` for endpoints.
With no argument it trains: SageMaker SDK v3 local mode (`ModelTrainer(training_mode=LOCAL_CONTAINER)`)
starts training containers with no command at all, while every serving path passes `serve`.
Any other first argument runs that command (e.g. `bash`), for debugging inside the image.
Before it execs any of them it turns on CUDA forward compatibility where the host driver is too old
(`container/cuda_compat.py`), and refuses, naming the SageMaker setting, where even that cannot help.
It then reads the secrets passed by reference (`NAME_SECRET_ARN`, `container/secrets.py`) into the
environment of what it execs; one it cannot read stops `train` and `serve` the same way.
For `train` and `serve` it puts caches and temporary files on SageMaker's storage volume (`scratch_environment`).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Mapping

from container import cuda_compat, secrets
from container.config import nearest
from container.opt_ml import OptML

VERBS = ("train", "serve")


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _stopped)  # as PID 1 a SIGTERM without a handler would be ignored
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        args = ["train"]
    verb = args[0]
    if verb not in VERBS and shutil.which(verb) is None:
        _fail(f"unknown verb '{verb}': did you mean '{nearest(verb, VERBS)}'? (expected train, serve, or a command "
              "on PATH)", training=OptML.from_env().hyperparameters_file.is_file())  # a job's ContainerArguments
    refusal = use_cuda_compat(verb) or cuda_compat.gpu_too_old() or secrets.resolve_into(os.environ)
    if refusal and verb in VERBS:
        _fail(refusal, training=verb == "train")
    if refusal:  # a debugging command (bash, nvidia-smi) still runs: it is how one looks at such a host
        print(f"llm-twin: {refusal}", file=sys.stderr, flush=True)
    if verb in VERBS:  # the same code as the `train`/`serve` executables, found without relying on PATH
        os.environ.update(scratch_environment(verb, os.environ))
        # Held, not lost, until train's or serve's handler is in place (the mask survives exec; a handler
        # does not, and a PID 1 without one ignores SIGTERM).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        os.execv(sys.executable, [sys.executable, "-m", verb, *args[1:]])
    os.execvp(verb, args)


def _stopped(signum, frame) -> None:
    verb = " ".join(sys.argv[1:2]) or "train"
    _fail(f"stopped by SIGTERM before {verb} started", training=verb == "train")


def _fail(message: str, training: bool) -> None:
    """Exit 1 saying why; in a training job also as DescribeTrainingJob's FailureReason (the failure file)."""
    if training:
        try:
            OptML.from_env().write_failure(message)
        except OSError:
            pass
    sys.exit(f"llm-twin: {message}")


def use_cuda_compat(verb: str) -> str | None:
    """Put the CUDA compatibility libraries first when the host's driver is older than the image's CUDA.
    Returns why the image cannot run on this host's driver at all, or None."""
    host, compat = cuda_compat.host_driver_version(), cuda_compat.compat_driver_version()
    refusal = cuda_compat.too_old(host, compat, verb)
    if refusal:
        return refusal
    library_path = cuda_compat.compat_library_path(os.environ.get("LD_LIBRARY_PATH", ""), host, compat)
    if library_path is None:
        return None
    print(f"llm-twin: host NVIDIA driver {cuda_compat.describe(host)} is older than this image's CUDA "
          f"(driver {cuda_compat.describe(compat)}): using the compatibility libraries in {cuda_compat.COMPAT_DIR}",
          file=sys.stderr, flush=True)
    os.environ["LD_LIBRARY_PATH"] = library_path
    return None


# Caches that default to the home directory or /tmp: Hugging Face downloads, vLLM's and Triton's compiled
# kernels, every other XDG cache, and temporary files (a base model's tarball is extracted there).
SCRATCH_VARIABLES = {"HF_HOME": "huggingface", "XDG_CACHE_HOME": "cache", "TRITON_CACHE_DIR": "triton",
                     "TMPDIR": "tmp"}


def scratch_environment(verb: str, environ: Mapping[str, str], endpoint_volume: Path = Path("/tmp")) -> dict[str, str]:
    """The cache and temporary-file variables the user left unset, pointed at SageMaker's storage volume.

    The container's own root layer is small; the volume is what VolumeSizeInGB (or the instance's NVMe)
    sizes. A training job gets it under /opt/ml (input/scratch: never uploaded, unlike model/, output/ and
    checkpoints/); an endpoint gets it mounted at /tmp, where temporary files already go (its /opt/ml/model
    is read-only). Each directory is created here; one that cannot be written is left to the library's
    default. HF_HOME defaults to $XDG_CACHE_HOME/huggingface, so a user's XDG_CACHE_HOME keeps it there.
    """
    if verb == "train":
        root = OptML.from_env(environ).root / "input" / "scratch"
    else:
        root = endpoint_volume
    chosen = {}
    for variable, name in SCRATCH_VARIABLES.items():
        if environ.get(variable) or (variable == "TMPDIR" and verb == "serve") \
                or (variable == "HF_HOME" and environ.get("XDG_CACHE_HOME")):
            continue
        try:
            (root / name).mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(root / name, os.W_OK):
            chosen[variable] = str(root / name)
    return chosen
