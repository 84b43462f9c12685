"""CUDA forward compatibility: run this image's CUDA on a host whose NVIDIA driver is older.

SageMaker hosts often run an older driver than the image's CUDA 13.0 needs (580+): by default, inference
runs driver 470 on g4dn/g5/p4d, 535 on g6/p5 and 550 on p5e, and batch transform 470 unless
TransformAmiVersion picks 535. Since NVIDIA Container Toolkit 1.17.4 the host no longer
mounts the CUDA compatibility libraries for the container; the image must choose them itself. The CUDA
base image ships them in /usr/local/cuda/compat (a libcuda.so.<driver version> built for newer CUDA on
older data-center drivers). The dynamic loader reads LD_LIBRARY_PATH only when a process starts, so the
entrypoint decides before it execs `train` or `serve`: compat libraries first when the host's driver is
older than theirs, untouched otherwise.

Forward compatibility only reaches back to driver branches NVIDIA still supported when the CUDA release
came out: for CUDA 13.0, R535 (long-term) and newer. An older driver (R470) cannot run this image at
all, so the entrypoint refuses it with the setting that fixes it instead of letting CUDA fail later.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

COMPAT_DIR = Path(os.environ.get("LLM_TWIN_CUDA_COMPAT_DIR", "/usr/local/cuda/compat"))
DRIVER_VERSION_FILE = Path(os.environ.get("LLM_TWIN_NVIDIA_VERSION_FILE", "/proc/driver/nvidia/version"))
# /proc/driver/nvidia is the host's, seen even by a container given no GPU; the control device is there
# only when a GPU is mapped in (docker run --gpus, SageMaker GPU instances).
GPU_DEVICE = Path(os.environ.get("LLM_TWIN_NVIDIA_DEVICE", "/dev/nvidiactl"))

# "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024" or, for the
# open kernel modules, "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.20  Release Build ..."
_DRIVER_LINE = re.compile(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)")
_COMPAT_LIB = re.compile(r"libcuda\.so\.(\d+(?:\.\d+)+)$")

Version = tuple[int, ...]

OLDEST_FORWARD_COMPATIBLE_DRIVER: Version = (535,)
# What gives a SageMaker job a driver this image can use (580 natively; 535 with forward compatibility).
NEWER_DRIVER = {
    "serve": "deploy with InferenceAmiVersion=al2023-ami-sagemaker-inference-gpu-4-1 (driver 580; `python -m launch "
             "deploy` sets it on GPU instances), or for batch transform "
             "TransformAmiVersion=al2-ami-sagemaker-batch-gpu-535 (`python -m launch batch` sets it)",
    "train": "training jobs have no host-image setting: use an instance family whose hosts run driver 535 or newer, "
             "or rebuild the image on an older CUDA",
}


def host_driver_version(version_file: Path = DRIVER_VERSION_FILE, device: Path = GPU_DEVICE) -> Version | None:
    """The loaded NVIDIA kernel driver's version, or None when this container has no GPU (a CPU host, or
    a GPU host that mapped none in)."""
    if not device.exists():
        return None
    try:
        match = _DRIVER_LINE.search(version_file.read_text())
    except OSError:
        return None
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def compat_driver_version(compat_dir: Path = COMPAT_DIR) -> Version | None:
    """The driver version the image's compatibility libcuda was built as, or None when there is none."""
    if not compat_dir.is_dir():
        return None
    versions = [tuple(int(part) for part in match.group(1).split("."))
                for match in (_COMPAT_LIB.match(path.name) for path in compat_dir.iterdir()) if match]
    return max(versions) if versions else None


def compat_library_path(library_path: str, host: Version | None, compat: Version | None,
                        compat_dir: Path = COMPAT_DIR) -> str | None:
    """The LD_LIBRARY_PATH to run with, or None to leave it as it is. Only an older driver branch needs the
    compatibility libraries: within one branch (580.65 and the image's 580.95) the driver already runs the
    CUDA release, and the libraries would only get in its way."""
    if host is None or compat is None or host[0] >= compat[0]:
        return None
    current = [part for part in library_path.split(":") if part]
    if str(compat_dir) in current:
        return None
    return ":".join([str(compat_dir), *current])


def too_old(host: Version | None, compat: Version | None, verb: str) -> str | None:
    """Why this image cannot use the host's driver even with the compatibility libraries, or None."""
    if host is None or compat is None or host[0] >= compat[0] or host >= OLDEST_FORWARD_COMPATIBLE_DRIVER:
        return None
    return (f"the host's NVIDIA driver {describe(host)} is too old for this image's CUDA (driver "
            f"{compat[0]}, or {describe(OLDEST_FORWARD_COMPATIBLE_DRIVER)}+ with forward compatibility): "
            f"{NEWER_DRIVER.get(verb, NEWER_DRIVER['serve'])}")


OLDEST_COMPUTE_CAPABILITY = (7, 5)  # CUDA 13 builds no kernels for Volta (V100, p3) or older


def gpu_too_old(device: Path = GPU_DEVICE) -> str | None:
    """Why this image's CUDA cannot run on the host's GPUs (a p3's V100), or None (no GPU, or nvidia-smi cannot
    say): refused here, not by the first kernel's "no kernel image is available" deep in a job."""
    if not device.exists() or shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    for line in out.splitlines():
        name, _, capability = line.rpartition(",")
        major, _, minor = capability.strip().partition(".")
        if major.isdigit() and minor.isdigit() and (int(major), int(minor)) < OLDEST_COMPUTE_CAPABILITY:
            return (f"the host's GPU {name.strip()} (compute capability {major}.{minor}) is older than this image's "
                    f"CUDA 13 supports (7.5: T4 and newer): use a g4dn, g5, g6, p4d, p5 or newer instance")
    return None


def describe(version: Version) -> str:
    return ".".join(map(str, version))
