"""Replace a small file in a way a crash, a power cut or a planted symlink cannot
tear: the daemon's records in ``state_dir`` (``attached.json``, ``runtime.json``).

The steps, each for a reason:

1. write the new bytes to a temporary name beside the file (same directory, so the
   rename is atomic), created with ``O_EXCL | O_NOFOLLOW`` after removing a stale one:
   a symlink planted at the temporary name is replaced, never written through;
2. ``fsync`` it: the bytes are on disk before any name points at them;
3. ``rename`` over the file: readers see the old file or the new one, never a mix;
4. ``fsync`` the directory: the rename itself survives a power cut.

Blocking (a few ``fsync``): call it from a worker thread in the event loop.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically make ``path`` hold ``data`` (see the module's steps)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    sync_dir(path.parent)


def sync_dir(directory: Path) -> None:
    """``fsync`` a directory (its entries); where directories cannot be opened or synced
    (some file systems), the rename is as durable as the platform makes it."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Remove ``path`` (if there) and make the removal durable."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    sync_dir(path.parent)
