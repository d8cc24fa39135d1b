"""Atomic file writing: whole files or none, strict JSON, and the usual permissions."""
import json
import os
import stat

import pytest

from quantlab.files import write_bytes, write_json


def test_write_json_writes_nan_and_infinity_as_null_with_sorted_keys(tmp_path):
    path = write_json(tmp_path / "r.json", {"b": float("nan"), "a": [1.5, float("inf")], "c": (1, 2)})
    text = path.read_text()
    assert json.loads(text) == {"a": [1.5, None], "b": None, "c": [1, 2]}
    assert text.index('"a"') < text.index('"b"') and "NaN" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def test_write_json_refuses_objects_it_cannot_represent_and_keeps_the_old_file(tmp_path):
    path = write_json(tmp_path / "r.json", {"ok": 1})
    with pytest.raises(TypeError, match="convert it"):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_written_files_are_readable_by_other_users_as_open_would_make_them(tmp_path):
    # mkstemp alone makes 0600 files: a shared cache or a CI artifact then cannot be read by others.
    previous = os.umask(0o022)
    try:
        path = write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_written_files_follow_the_process_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        path = write_bytes(tmp_path / "private.bin", b"x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
