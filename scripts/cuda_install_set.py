"""The CUDA image's install set, resolved for the image's platform without installing anything.

    python scripts/cuda_install_set.py check   # CI: what the Dockerfile installs by default resolves, as locked
    python scripts/cuda_install_set.py lock    # (re)write requirements-cuda.lock

The default build (`docker build .`, ENGINE=cuda) runs `pip install torch==X` and then
`pip install -r requirements.txt -r requirements-cuda.txt -c requirements-cuda.lock` on Ubuntu 24.04:
CPython 3.12, glibc 2.39, x86-64, from PyPI alone (PyPI's torch is its CUDA 13.0 build). This script asks
pip for that same set with `--dry-run --only-binary :all: --platform ... --python-version 3.12`, so a pin
without a wheel for the image, or a lock that disagrees with the requirements, fails here (and in CI)
instead of in a `docker build` nobody runs until release.

DeepSpeed is the one sdist (the image builds it against the installed torch): a wheel-only resolution
cannot read it, so it is left out and its own requirements, read from the DeepSpeed of the same version
installed in this environment, are resolved in its place; `check` then confirms PyPI has its sdist.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

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


def platform_args() -> list[str]:
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 16, -1)]
    tags += ["manylinux2014_x86_64", "linux_x86_64"]
    return [arg for tag in tags for arg in ("--platform", tag)] + [
        "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp" + PYTHON_VERSION.replace(".", ""),
        "--only-binary", ":all:"]


def pip_env() -> dict[str, str]:
    """PyPI alone, as in the image's build: no pip.conf, find-links, extra indexes or constraints of this machine."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def resolve(constraints: Path) -> tuple[dict[str, str], str]:
    """(name -> version of the resolved set, "") or ({}, pip's error output)."""
    with tempfile.TemporaryDirectory() as tmp:
        reqs, report = Path(tmp) / "requirements.txt", Path(tmp) / "report.json"
        reqs.write_text("\n".join(requirements()) + "\n")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--dry-run",
             "--ignore-installed", "--target", str(Path(tmp) / "target"), "--report", str(report),
             *platform_args(), "-r", str(reqs), "-c", str(constraints)],
            capture_output=True, text=True, env=pip_env())
        if result.returncode != 0:
            return {}, "\n".join(line for line in (result.stdout + result.stderr).splitlines()
                                  if not line.startswith(("Collecting", "  Using", "  Downloading", "Requirement", "Downloading")))
        installs = json.loads(report.read_text())["install"]
        return {normalise(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}, ""


def sdist_exists(name: str, version: str) -> str:
    """"" when PyPI serves the sdist of name==version, else pip's error output."""
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--no-binary", ":all:", "-d", tmp, f"{name}=={version}"], capture_output=True, text=True, env=pip_env())
        return "" if result.returncode == 0 else result.stdout + result.stderr


def check() -> int:
    resolved, error = resolve(LOCK)
    if error:
        print(f"the CUDA install set does not resolve for CPython {PYTHON_VERSION} manylinux x86-64:\n{error}")
        return 1
    locked = pins(LOCK)
    wrong = {name: (version, locked.get(name)) for name, version in resolved.items() if locked.get(name) != version}
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
          f"{len(resolved)} wheels, every one locked (torch {resolved['torch']}, CUDA runtime "
          f"{resolved.get('nvidia-cuda-runtime', '?')}, vllm {resolved['vllm']}), plus the {SDIST_ONLY} {deepspeed} sdist")
    return 0


def lock() -> int:
    """Resolve with the CPU lock's versions as preferences, dropping each one the CUDA set cannot take."""
    constraints = pins(CPU_LOCK)
    dropped = []
    while True:
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as file:
            file.write("".join(f"{name}=={version}\n" for name, version in constraints.items()))
            file.flush()
            resolved, error = resolve(Path(file.name))
        if not error:
            break
        conflict = re.search(r"The user requested \(constraint\) ([A-Za-z0-9._-]+)==", error)
        if not conflict or normalise(conflict.group(1)) not in constraints:
            print(error)
            return 1
        dropped.append(normalise(conflict.group(1)))
        del constraints[dropped[-1]]
    header = [
        "# What the CUDA image installs (the Dockerfile's default, ENGINE=cuda), every package at its exact version,",
        f"# resolved for CPython {PYTHON_VERSION} on manylinux x86-64 from PyPI by `python scripts/cuda_install_set.py lock`",
        "# (CI re-resolves it: `... check`). The versions of requirements-cpu.lock where the CUDA set allows them"
        + (f"; not: {', '.join(dropped)}." if dropped else "."),
        f"# {SDIST_ONLY} (an sdist, built in the image) is pinned by requirements.txt.",
    ]
    LOCK.write_text("\n".join(header + [f"{name}=={version}" for name, version in sorted(resolved.items())]) + "\n")
    print(f"wrote {LOCK.name}: {len(resolved)} packages" + (f" (differ from the CPU lock: {', '.join(dropped)})"
                                                            if dropped else ""))
    return 0


if __name__ == "__main__":
    commands = {"check": check, "lock": lock}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python {sys.argv[0]} check|lock")
    sys.exit(commands[sys.argv[1]]())
