"""Atomic file writing: every file quantlab writes (cache entries, results.json, golden files, report)
appears whole or not at all.

A reader (a CI gate, a parallel pytest worker, another user of a shared cache) sees the old file or the
new one, never half of one, and an interrupted run (Ctrl-C, a killed worker) leaves no partial file.
Files are created with the usual 0644 mode less the process umask, as ``open()`` would create them:
``tempfile.mkstemp`` alone makes them 0600, unreadable by the other users of a shared cache or of CI
artifacts.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (no other thread writes files
    # between these two calls in quantlab, and the value is restored either way).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> Path:
    """Write ``obj`` as JSON (sorted keys, indent 2) atomically; NaN and infinities are written as null
    (see ``quantlab.results.jsonable``)."""
    from quantlab.results import jsonable

    text = json.dumps(jsonable(obj), sort_keys=True, indent=2, allow_nan=False) + "\n"
    return write_text(path, text)
