"""Exclusive ownership of a state directory and a partition root, taken before anything
is reaped or created.

Why: at start the daemon kills whatever it finds in its partition root, because a dead
predecessor may have left workers there. That is right only if no *live* daemon uses the
root. The control socket cannot tell (it may be deleted, or the other daemon may use
another path), so each daemon holds ``flock`` locks for its whole life:

* ``<state_dir>/daemon.lock``: the file also holds the owner's pid, for the message;
* each cgroup root directory of the backend (cgroupfs directories take ``flock`` like
  any inode), so two configs with different state directories that name the same
  cgroup root still exclude each other.

``flock`` locks belong to the open file description: they vanish when the daemon dies,
however it dies, so a crash never leaves a stale lock behind; the descriptors are
``O_CLOEXEC`` so no worker inherits (and keeps alive) a lock. A second daemon that
finds a lock taken refuses to start (``InUse``, exit code 3) and has touched nothing.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from pathlib import Path

LOCK_FILE = "daemon.lock"


class InUse(Exception):
    """Another live daemon owns the state directory or the partition root."""


class Ownership:
    """The locks of one daemon; ``release`` (or the process's exit) drops them."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def take(self, state_dir: Path, roots: Iterable[Path] = ()) -> None:
        """Lock ``state_dir`` and every root directory (created if missing), or raise
        ``InUse`` having locked nothing."""
        try:
            self._lock_state(state_dir)
            for root in roots:
                self._lock_dir(root)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def _lock_state(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        if not _try_lock(fd):
            owner = _read_pid(fd)
            os.close(fd)
            who = f"pid {owner}" if owner else "another process"
            raise InUse(
                f"another supervisord-qnx ({who}) owns the state directory {state_dir} "
                f"(lock {path}); stop it first (supervisorctl-qnx shutdown) or give this one "
                f"its own state_dir and cgroup_root"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fds.append(fd)

    def _lock_dir(self, root: Path) -> None:
        # The root may be removed by its previous owner's shutdown between our open and
        # our flock: then the lock is on a dead inode, so check and try again.
        for _ in range(10):
            try:
                os.mkdir(root)
            except FileExistsError:
                pass
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            if not _try_lock(fd):
                os.close(fd)
                raise InUse(
                    f"another supervisord-qnx owns the partition root {root} (it holds a lock "
                    f"on that directory); stop it first or give this daemon another "
                    f"cgroup_root"
                )
            try:
                same = os.stat(root).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fds.append(fd)
                return
            os.close(fd)
        raise InUse(f"the partition root {root} keeps being removed and re-created")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or "0") or None
    except (OSError, ValueError):
        return None
