"""The CUDA image's install set resolves from PyPI for the image's platform, exactly as locked.

CI builds only the CPU image (no CUDA base image can be pulled here), so this is what proves the default
`docker build .` can install its packages: scripts/cuda_install_set.py asks pip for the Dockerfile's own
install set with `--dry-run --only-binary :all: --platform manylinux_2_N_x86_64 --python-version 3.12`
against PyPI (needs network to PyPI, as `make venv` does).
"""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import cuda_install_set  # noqa: E402


def dockerfile_args() -> dict[str, str]:
    return dict(line.removeprefix("ARG ").split("=", 1) for line in (REPO / "Dockerfile").read_text().splitlines()
                if line.startswith("ARG ") and "=" in line)


def test_the_default_build_is_the_set_the_check_resolves():
    args = dockerfile_args()
    assert args["ENGINE"] == "cuda"
    assert args["TORCH_PIP_ARGS"] == '""'  # PyPI, the index the check resolves against
    # Ubuntu 24.04's python3 is the 3.12 the check resolves for; its glibc (2.39) bounds the manylinux tags.
    for base in (args["BUILD_BASE"], args["RUNTIME_BASE"]):
        assert "ubuntu24.04@sha256:" in base
    assert cuda_install_set.PYTHON_VERSION == "3.12" and cuda_install_set.GLIBC_MINOR == 39


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
    assert "every one locked" in result.stdout
