"""The image's ENTRYPOINT: `llm-twin train|serve|<command>`.

SageMaker runs `docker run IMAGE train` for training jobs and `docker run IMAGE serve` for endpoints.
With no argument it trains: SageMaker SDK v3 local mode (`ModelTrainer(training_mode=LOCAL_CONTAINER)`)
starts training containers with no command at all, while every serving path passes `serve`.
Any other first argument runs that command (e.g. `bash`), for debugging inside the image.
Before it execs any of them it turns on CUDA forward compatibility where the host driver is too old
(`container/cuda_compat.py`).
"""

from __future__ import annotations

import os
import shutil
import sys

from container import cuda_compat
from container.config import nearest

VERBS = ("train", "serve")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        args = ["train"]
    verb = args[0]
    if verb not in VERBS and shutil.which(verb) is None:
        sys.exit(f"llm-twin: unknown verb '{verb}': did you mean '{nearest(verb, VERBS)}'? "
                 f"(expected train, serve, or a command on PATH)")
    use_cuda_compat()
    if verb in VERBS:  # the same code as the `train`/`serve` executables, found without relying on PATH
        os.execv(sys.executable, [sys.executable, "-m", verb, *args[1:]])
    os.execvp(verb, args)


def use_cuda_compat() -> None:
    """Put the CUDA compatibility libraries first when the host's driver is older than the image's CUDA."""
    host, compat = cuda_compat.host_driver_version(), cuda_compat.compat_driver_version()
    library_path = cuda_compat.compat_library_path(os.environ.get("LD_LIBRARY_PATH", ""), host, compat)
    if library_path is None:
        return
    print(f"llm-twin: host NVIDIA driver {cuda_compat.describe(host)} is older than this image's CUDA "
          f"(driver {cuda_compat.describe(compat)}): using the compatibility libraries in {cuda_compat.COMPAT_DIR}",
          file=sys.stderr, flush=True)
    os.environ["LD_LIBRARY_PATH"] = library_path
