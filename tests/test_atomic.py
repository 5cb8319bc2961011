"""mulo._atomic.atomic_path: all-or-nothing writes with the permissions of a plain open()."""

import os

import pytest

from mulo._atomic import atomic_path


def test_replaces_target_with_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    old_mask = os.umask(0o022)
    try:
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and not target.exists()
            tmp.write_bytes(b"new")
    finally:
        os.umask(old_mask)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target, durable=True) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
