"""Add to a lock the sha256 of every file that may install each pin, for pip's hash-checking mode.

    python scripts/lock_hashes.py FILE [--python 3.11] [--index URL]... [--find-links DIR]...

Each `name==version` line of FILE becomes `name==version --hash=sha256:... ...`: one hash per file of exactly
that version that can install on the lock's platform, CPython X.Y (--python, default the running one) on
x86-64 Linux (manylinux, linux and pure-Python wheels), and the sdist. Nothing is resolved again: the versions
stay the lock's. The hashes come from the simple pages of PyPI and of each --index (PEP 503: the sha256 is in
each file's link), and from wheels in --find-links folders, hashed here (where this machine keeps torch's CPU
build). An index that cannot be reached is reported and skipped; a pin left without any hash fails the
script, which then writes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import ssl
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

from packaging import tags
from packaging.utils import (InvalidSdistFilename, InvalidWheelFilename, canonicalize_name, parse_sdist_filename,
                             parse_wheel_filename)
from packaging.version import InvalidVersion, Version

PYPI = "https://pypi.org/simple"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#\\]+)((?:\s+--hash=\S+)*)\s*$")
HASH = re.compile(r"^[0-9a-f]{64}$")
GLIBC_MINORS = range(5, 40)  # manylinux_2_5 .. manylinux_2_39 (Ubuntu 24.04's glibc, the newest base here)
LEGACY_LINUX = ("manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64")


class Links(HTMLParser):
    """The links of a PEP 503 simple page: file name -> sha256 (from the link's #sha256= fragment)."""

    def __init__(self):
        super().__init__()
        self.files: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href") or ""
        url = urlparse(href)
        if tag == "a" and url.fragment.startswith("sha256="):
            self.files[unquote(url.path.rsplit("/", 1)[-1])] = url.fragment.removeprefix("sha256=").lower()


class Indexes:
    """PEP 503 simple indexes, read over HTTPS (PIP_CERT, a TLS-intercepting proxy's CA, is honoured)."""

    def __init__(self, urls: list[str]):
        self.urls = [url.rstrip("/") for url in urls]
        self.unreachable: dict[str, str] = {}
        self.context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)

    def files(self, name: str) -> dict[str, str]:
        found: dict[str, str] = {}
        for url in self.urls:
            if url not in self.unreachable:
                found.update(self._page(url, canonicalize_name(name)))
        return found

    def _page(self, url: str, project: str) -> dict[str, str]:
        try:
            with urllib.request.urlopen(f"{url}/{project}/", timeout=120, context=self.context) as response:
                parser = Links()
                parser.feed(response.read().decode("utf-8", "replace"))
                return parser.files
        except urllib.error.HTTPError as e:
            if e.code == 404:  # not on this index
                return {}
            self.unreachable[url] = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            self.unreachable[url] = str(getattr(e, "reason", e))
        return {}


def local_files(folders: list[Path], name: str) -> dict[str, str]:
    """Wheels and sdists of `name` in find-links folders: file name -> sha256 of its bytes."""
    found = {}
    for folder in folders:
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.is_file() and distribution(path.name, name) is not None:
                found[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def supported_tags(python: str) -> set[tags.Tag]:
    """What pip accepts for CPython `python` ("3.11") on x86-64 Linux, for any glibc up to GLIBC_MINORS."""
    version = tuple(int(part) for part in python.split("."))
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in reversed(GLIBC_MINORS)] + list(LEGACY_LINUX)
    interpreter = f"cp{version[0]}{version[1]}"
    return {*tags.cpython_tags(version, platforms=platforms),
            *tags.compatible_tags(version, interpreter=interpreter, platforms=platforms)}


def distribution(filename: str, name: str) -> tuple[Version, frozenset | None] | None:
    """(version, wheel tags) of a file of project `name`; wheel tags None for an sdist; None for other files."""
    try:
        if filename.endswith(".whl"):
            project, version, _, wheel_tags = parse_wheel_filename(filename)
        elif filename.endswith((".tar.gz", ".zip")):
            (project, version), wheel_tags = parse_sdist_filename(filename), None
        else:
            return None
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        return None
    return (version, wheel_tags) if project == canonicalize_name(name) else None


def pin_hashes(name: str, version: str, files: dict[str, str], supported: set[tags.Tag]) -> list[str]:
    """The sha256 of each file of exactly name==version that installs on the platform, and of its sdist."""
    chosen = set()
    for filename, digest in files.items():
        found = distribution(filename, name)
        if found and found[0] == Version(version) and HASH.match(digest) and (found[1] is None or found[1] & supported):
            chosen.add(digest)
    return sorted(chosen)


def add_hashes(path: Path, python: str, indexes: list[str] = (), find_links: list[Path] = ()) -> list[str]:
    """Rewrite `path` with the hashes of each pin; returns the pins no source had a file for (then nothing is
    written)."""
    lines = path.read_text().splitlines()
    pins = [(index, match.group(1), match.group(2)) for index, line in enumerate(lines)
            if (match := PIN.match(line.strip()))]
    sources = Indexes([PYPI, *indexes])
    supported = supported_tags(python)

    def hashes(pin):
        _, name, version = pin
        return pin_hashes(name, version, {**sources.files(name), **local_files(list(find_links), name)}, supported)

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = list(pool.map(hashes, pins))
    for url, reason in sources.unreachable.items():
        print(f"warning: {url} could not be read ({reason}): its files are not in the hashes", file=sys.stderr)
    missing = [f"{name}=={version}" for (_, name, version), digests in zip(pins, found) if not digests]
    if not missing:
        for (index, name, version), digests in zip(pins, found):
            lines[index] = " ".join([f"{name}=={version}", *(f"--hash=sha256:{digest}" for digest in digests)])
        path.write_text("\n".join(lines) + "\n")
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--python", default=f"{sys.version_info[0]}.{sys.version_info[1]}",
                        help="the CPython the lock installs on (default: this one)")
    parser.add_argument("--index", action="append", default=[], help="another simple index, after PyPI")
    parser.add_argument("--find-links", action="append", default=[], type=Path, help="a folder of wheels")
    args = parser.parse_args()
    missing = add_hashes(args.file, args.python, args.index, args.find_links)
    if missing:
        print(f"{args.file}: no file for CPython {args.python} on x86-64 Linux found of: {', '.join(missing)}; "
              "nothing written (give the index or folder that has them: --index, --find-links)", file=sys.stderr)
        return 1
    print(f"{args.file}: hashes for CPython {args.python} on x86-64 Linux added to every pin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
