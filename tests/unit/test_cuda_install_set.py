"""The CUDA image's install set resolves from PyPI for the image's platform, exactly as locked.

CI builds only the CPU image (no CUDA base image can be pulled here), so this is what proves the default
`docker build .` can install its packages: scripts/cuda_install_set.py resolves the Dockerfile's own install
set with `uv pip compile --python-version 3.12 --python-platform x86_64-manylinux_2_39 --only-binary :all:`
against PyPI (about 15 s; needs network to PyPI, as `make venv` does).
"""

import re
import subprocess
import sys

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import cuda_install_set  # noqa: E402


def dockerfile_args() -> dict[str, str]:
    return dict(line.removeprefix("ARG ").split("=", 1) for line in (REPO / "Dockerfile").read_text().splitlines()
                if line.startswith("ARG ") and "=" in line)


# The Python and glibc of each Ubuntu release the CUDA bases could be on: what the check must resolve for.
UBUNTU = {"ubuntu24.04": ("3.12", 39), "ubuntu22.04": ("3.10", 35)}


def test_the_default_build_is_the_set_the_check_resolves():
    args = dockerfile_args()
    assert args["ENGINE"] == "cuda"
    assert args["TORCH_PIP_ARGS"] == '""'  # PyPI, the index the check resolves against
    releases = {re.search(r"-(ubuntu\d+\.\d+)@sha256:", args[base]).group(1) for base in ("BUILD_BASE", "RUNTIME_BASE")}
    assert len(releases) == 1  # the venv built on one is run on the other
    assert UBUNTU[releases.pop()] == (cuda_install_set.PYTHON_VERSION, cuda_install_set.GLIBC_MINOR)


def test_the_lock_was_resolved_for_the_images_python_not_this_one():
    """vllm asks for `six` and `setuptools<81` only `; python_version > "3.11"`: a resolution that judged
    markers on this machine's Python 3.11 would lock neither, and the image's pip would then fail."""
    locked = cuda_install_set.pins(cuda_install_set.LOCK)
    assert "six" in locked
    assert int(locked["setuptools"].split(".")[0]) < 81
    assert locked["nvidia-cuda-runtime"].startswith("13.0.") and locked["nvidia-nvjitlink"].startswith("13.0.")


def test_the_cuda_bases_match_torchs_cuda():
    """The devel base's nvcc builds DeepSpeed's ops against torch: same CUDA major.minor as torch's runtime wheel."""
    locked = cuda_install_set.pins(cuda_install_set.LOCK)
    runtime = re.match(r"(\d+\.\d+)", locked["nvidia-cuda-runtime"]).group(1)
    for base in dockerfile_args().values():
        if base.startswith("nvidia/cuda:"):
            assert base.startswith(f"nvidia/cuda:{runtime}."), (base, runtime)
    assert locked["torch"] == cuda_install_set.pins(REPO / "requirements.txt")["torch"]


def test_the_cuda_install_set_resolves_as_locked():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "cuda_install_set.py"), "check"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exactly the lock" in result.stdout
