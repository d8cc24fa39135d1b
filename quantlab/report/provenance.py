"""Provenance: what produced a run (spec, seed, software versions, machine, git revision, time), for
manifest.json and for the results themselves."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from quantlab import __version__

# The libraries whose versions can change a result (GPTQ's rounding decisions follow torch's kernels;
# SmolLM2's float weights come out of transformers' GGUF dequantizer).
RESULT_LIBRARIES = ("torch", "numpy", "transformers", "gguf", "safetensors")


def manifest(spec_name, spec_sha256, seed) -> dict:
    """What produced a run: spec, seed, software versions, machine, git revision, time (UTC)."""
    return {
        "spec": spec_name,
        "spec_sha256": spec_sha256,
        "seed": seed,
        "quantlab_version": __version__,
        "versions": library_versions(),
        "machine": _machine_description(),
        "git": _git_state(Path.cwd()),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def library_versions() -> dict:
    """Python's and each library's installed version (None when not installed)."""
    def installed(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    versions = {"python": platform.python_version()}
    for package in (*RESULT_LIBRARIES, "matplotlib"):
        versions[package] = installed(package)
    return versions


def _machine_description() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _physical_memory_bytes(),
        "python_implementation": platform.python_implementation(),
    }


def _physical_memory_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX, or the name is unknown here
        return None


def _git_state(directory: Path) -> dict:
    """Revision and dirtiness of the git checkout containing ``directory``; nulls when git is
    missing or this is not a checkout (an installed package, a tarball)."""
    def git(*args):
        done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        revision = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no") if revision else None
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}
    return {"revision": revision, "dirty": None if status is None else bool(status)}
