"""The CUDA image's install set, resolved for the image's platform without installing anything.

    python scripts/cuda_install_set.py check   # CI: what the Dockerfile installs by default resolves, as locked
    python scripts/cuda_install_set.py lock    # (re)write requirements-cuda.lock, with its hashes

The default build (`docker build .`, ENGINE=cuda) runs `pip install -r requirements.txt -r
requirements-cuda.txt -c requirements-cuda.lock` on Ubuntu 24.04: CPython 3.12, glibc 2.39, x86-64, from
PyPI alone (PyPI's torch is its CUDA 13.0 build). This script resolves that same set with uv for that
target (`uv pip compile --python-version 3.12 --python-platform x86_64-manylinux_2_39 --only-binary
:all:`), so a pin without a wheel for the image, or a lock that disagrees with the requirements, fails
here (and in CI) instead of in a `docker build` nobody runs until release. uv, not pip: pip's
`--python-version` changes only which wheels fit, while dependency markers (`; python_version > "3.11"`,
`; platform_machine == ...`) are still judged by the Python running pip; uv judges them for the target.
With every package pinned exactly by the lock, any correct resolver (pip in the image) reaches the same set.

DeepSpeed is the one sdist (the image builds it against the installed torch): a wheel-only resolution
cannot read it, so it is left out and its own requirements, read from the DeepSpeed of the same version
installed in this environment, are resolved in its place; `check` then confirms PyPI has its sdist.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lock_hashes import add_hashes  # scripts/, beside this file

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements-cuda.lock"
CPU_LOCK = REPO / "requirements-cpu.lock"
PYTHON_VERSION = "3.12"  # Ubuntu 24.04's python3, the Dockerfile's CUDA bases
GLIBC_MINOR = 39  # Ubuntu 24.04's glibc 2.39: every manylinux_2_N tag up to it installs there
SDIST_ONLY = "deepspeed"


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line (names normalised as pip does)."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==([^\s;#]+)", line.strip())
        if match:
            found[normalise(match.group(1))] = match.group(2)
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements() -> list[str]:
    """requirements.txt + requirements-cuda.txt, with DeepSpeed replaced by its own requirements."""
    lines = []
    for name in ("requirements.txt", "requirements-cuda.txt"):
        lines += [line.strip() for line in (REPO / name).read_text().splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    wanted = {normalise(line.split("==")[0]): line for line in lines}
    pinned = wanted[SDIST_ONLY].split("==")[1]
    installed = importlib.metadata.version(SDIST_ONLY)
    if installed != pinned:
        sys.exit(f"{SDIST_ONLY} {installed} is installed here but {pinned} is pinned: run `make venv` first")
    own = [req for req in importlib.metadata.requires(SDIST_ONLY) or [] if "extra ==" not in req]
    return [line for line in lines if normalise(line.split("==")[0]) != SDIST_ONLY] + own


def uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not found:
        sys.exit("uv is not installed: run `make venv` (requirements-dev.txt pins it)")
    return found


def clean_env() -> dict[str, str]:
    """PyPI alone, as in the image's build: none of this machine's pip or uv indexes, links or constraints.
    A TLS-intercepting proxy's CA (given to pip as PIP_CERT) is passed on to uv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    if os.environ.get("PIP_CERT") and "SSL_CERT_FILE" not in env:
        env["SSL_CERT_FILE"] = os.environ["PIP_CERT"]
    return env


def resolve(constraints: Path | None, preferences: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """(name -> version of the resolved set, "") or ({}, uv's error). preferences: versions to keep where
    the set allows them (uv reads them from the output file it is asked to rewrite). The set holds DeepSpeed
    at requirements.txt's pin: left out of the resolution, it is in the lock all the same (its sdist's hash)."""
    with tempfile.TemporaryDirectory() as tmp:
        reqs, out = Path(tmp) / "requirements.in", Path(tmp) / "resolved.txt"
        reqs.write_text("\n".join(requirements()) + "\n")
        out.write_text("".join(f"{name}=={version}\n" for name, version in (preferences or {}).items()))
        command = [uv(), "pip", "compile", str(reqs), "-o", str(out), "--python-version", PYTHON_VERSION,
                   "--python-platform", f"x86_64-manylinux_2_{GLIBC_MINOR}", "--only-binary", ":all:", "--no-config",
                   "--index-url", "https://pypi.org/simple", "--no-header", "--no-annotate", "--quiet"]
        if constraints:
            command += ["-c", str(constraints)]
        result = subprocess.run(command, capture_output=True, text=True, env=clean_env())
        if result.returncode != 0:
            return {}, result.stdout + result.stderr
        return {**pins(out), SDIST_ONLY: pins(REPO / "requirements.txt")[SDIST_ONLY]}, ""


def sdist_exists(name: str, version: str) -> str:
    """"" when PyPI serves the sdist of name==version, else pip's error output."""
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--no-binary", name, "-d", tmp, f"{name}=={version}"], capture_output=True, text=True, env=clean_env())
        return "" if result.returncode == 0 else result.stdout + result.stderr


def check() -> int:
    resolved, error = resolve(LOCK)
    if error:
        print(f"the CUDA install set does not resolve for CPython {PYTHON_VERSION} manylinux x86-64:\n{error}")
        return 1
    locked = pins(LOCK)
    wrong = {name: (resolved.get(name), locked.get(name)) for name in resolved.keys() | locked.keys()
             if locked.get(name) != resolved.get(name)}
    if wrong:
        print("requirements-cuda.lock does not pin what resolves (name: resolved, locked); run "
              "`python scripts/cuda_install_set.py lock`:")
        for name, (version, pin) in sorted(wrong.items()):
            print(f"  {name}: {version}, {pin}")
        return 1
    deepspeed = pins(REPO / "requirements.txt")[SDIST_ONLY]
    error = sdist_exists(SDIST_ONLY, deepspeed)
    if error:
        print(f"PyPI has no sdist of {SDIST_ONLY}=={deepspeed}:\n{error}")
        return 1
    print(f"the CUDA image's install set resolves from PyPI for CPython {PYTHON_VERSION} on manylinux x86-64: "
          f"{len(resolved) - 1} wheels, exactly the lock (torch {resolved['torch']}, CUDA runtime "
          f"{resolved.get('nvidia-cuda-runtime', '?')}, vllm {resolved['vllm']}), "
          f"plus the {SDIST_ONLY} {deepspeed} sdist")
    return 0


def lock() -> int:
    """Resolve afresh, keeping requirements-cpu.lock's versions wherever the CUDA set allows them."""
    cpu = pins(CPU_LOCK)
    resolved, error = resolve(None, preferences=cpu)
    if error:
        print(error)
        return 1
    differ = sorted(name for name, version in resolved.items() if cpu.get(name, version) != version)
    header = [
        "# What the CUDA image installs (the Dockerfile's default, ENGINE=cuda), every package at its exact version,",
        f"# resolved for CPython {PYTHON_VERSION} on x86_64-manylinux_2_{GLIBC_MINOR} from PyPI by "
        "`python scripts/cuda_install_set.py lock`",
        "# (CI re-resolves it: `... check`). requirements-cpu.lock's versions where the CUDA set allows them"
        + (f"; not: {', '.join(differ)}." if differ else "."),
        f"# {SDIST_ONLY} (an sdist, built in the image) is requirements.txt's pin. Each pin carries the sha256 of its "
        "files for that",
        "# platform (scripts/lock_hashes.py): the Dockerfile installs with --require-hashes.",
    ]
    LOCK.write_text("\n".join(header + [f"{name}=={version}" for name, version in sorted(resolved.items())]) + "\n")
    missing = add_hashes(LOCK, PYTHON_VERSION)
    if missing:
        print(f"PyPI has no file for CPython {PYTHON_VERSION} on x86-64 Linux of: {', '.join(missing)}")
        return 1
    print(f"wrote {LOCK.name}: {len(resolved)} packages" + (f" (differ from the CPU lock: {', '.join(differ)})"
                                                            if differ else ""))
    return 0


if __name__ == "__main__":
    commands = {"check": check, "lock": lock}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python {sys.argv[0]} check|lock")
    sys.exit(commands[sys.argv[1]]())
