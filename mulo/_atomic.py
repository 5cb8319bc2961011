"""Crash-safe file writes: write a temp file beside the target, then rename it over the target.

A crash or Ctrl-C at any moment leaves the old file or the complete new one under the name, never
a torn one, and no temp file behind. The new file gets the permissions a plain ``open(path, "w")``
would give it (``mkstemp`` alone would leave it 0600).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(
    dest: str | os.PathLike, suffix: str = ".tmp", mode: int = 0o666, durable: bool = False
) -> Iterator[Path]:
    """Yield a temp path in ``dest``'s directory; on a clean exit it replaces ``dest``.

    ``mode`` is filtered by the umask as ``open`` would; ``durable`` fsyncs the file and the
    directory, so the rename survives a power cut (checkpoints)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, mode & ~_umask())
        if durable:
            _fsync(tmp)
        os.replace(tmp, dest)
        if durable:
            _fsync(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)
