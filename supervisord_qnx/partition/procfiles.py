"""The /proc files the portable sampler reads over and over, kept open between passes.

Every sample of a partition reads two small files per process of it: ``/proc/<pid>/stat``
(its memory, parent, state, threads) and ``/proc/<pid>/task/<pid>/children`` (what is
below it: ``partition/proctree.py``). Opened, read and closed each time, that is six
system calls per process, and the ``open`` (a path walk through procfs, an inode and a
dentry set up and torn down) costs more than the read: at 1000 idle workers a pass over
all of them took 24 ms of CPU, of which the opens and closes were about two thirds
(measured on this 2-core machine, issue 14). Kept open, each file is re-read with one
``pread`` at offset 0, which makes procfs generate it afresh.

Why a kept descriptor never reads the wrong process: a ``/proc/<pid>`` file that is open
names the process it was opened for, not the number. Once that process has ended and
been reaped, reading its ``stat`` fails (``ESRCH``) even if the number now belongs to
another process. Then the entry is dropped, both files with it, and the path is opened
again: the caller sees exactly what a fresh open by path would show. The ``children``
descriptor is only read right after a successful ``stat`` read through the same entry
(``proctree.subtree`` and ``info`` do it in that order), so it too belongs to a process
that was alive a moment ago, never to a later owner of the number.

What it holds, and the bounds:

* One entry per process the sampler walks (the workers, what is below them, the
  daemon's orphans): two descriptors. A process that is no longer walked (it ended, its
  partition went away) is closed by the sweep, at most ``2 * horizon`` after its last
  read; ``close`` closes everything (the backend's shutdown).
* The descriptor limit: descriptors are handed out lowest-free-first, so the number a new
  one gets says how full the table is. One that comes back at or above ``ceiling``
  (``ceiling_for`` the soft ``RLIMIT_NOFILE``: an eighth of it, at least 320, stays
  free) is closed at once and that file is read the old way, by path: the cache never
  takes the last descriptors that spawns, log pipes and control connections need (the
  daemon sizes its limit for two per portable worker, ``daemon.FDS_PER_WORKER``).
* Not thread-safe: one sampling pass at a time uses it (``PortableBackend.sample`` takes
  ``busy``; a second, concurrent caller reads by path).

Where procfs has no such files (QNX's ``/proc`` has ``/proc/<pid>/as`` only) every open
fails and nothing is kept: the reads answer ``None`` as the path reads do.
"""

from __future__ import annotations

import os
import resource
import threading
import time

STAT_SIZE = 4096  # a stat line is a few hundred bytes
CHILDREN_SIZE = 65536  # some 9,000 pids


class PathReads:
    """Every read opens the path, reads once and closes: no state, any thread."""

    def stat(self, pid: int) -> bytes | None:
        return _read_path(f"/proc/{pid}/stat", STAT_SIZE)

    def children(self, pid: int, tid: int) -> bytes | None:
        return _read_path(f"/proc/{pid}/task/{tid}/children", CHILDREN_SIZE)


PATHS = PathReads()


def _read_path(path: str, size: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


# Descriptors never taken by the cache, at the least: the daemon's own estimate for
# itself and its control connections (daemon.FDS_BASE + FDS_CONNECTIONS).
RESERVE = 320


def ceiling_for(soft: int) -> int:
    """The first descriptor number the cache does not keep, under a soft limit of
    ``soft``: an eighth of the limit, and at least ``RESERVE``, stay free for spawns, log
    pipes and control connections. The daemon sets its soft limit to twice its estimate
    (``daemon.raise_fd_limit``), which counts two descriptors per portable worker for
    this cache; what a running worker holds besides (its log pipe and lock, about three)
    fits in the other half, so every worker's files are kept (tests/test_procfiles.py)."""
    return max(0, soft - max(RESERVE, soft // 8))


def default_ceiling() -> int:
    """``ceiling_for`` this process's soft descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 20
    return ceiling_for(soft)


class ProcFiles(PathReads):
    """Open ``stat`` and main-thread ``children`` files per pid, re-read with ``pread``."""

    def __init__(self, horizon: float = 8.0, ceiling: int | None = None) -> None:
        self.horizon = horizon
        self._fixed_ceiling = ceiling
        self.ceiling = ceiling if ceiling is not None else default_ceiling()
        # pid -> [stat fd, children fd (-1: not opened yet), monotonic time of last use]
        self._open: dict[int, list[int | float]] = {}
        self._swept = time.monotonic()
        self._now = self._swept
        self.busy = threading.Lock()

    def __len__(self) -> int:
        return len(self._open)

    def descriptors(self) -> int:
        """How many descriptors the cache holds now."""
        return sum(1 + (e[1] >= 0) for e in self._open.values())

    def begin(self, now: float) -> None:
        """A pass starts at ``now`` (monotonic): the use stamp of what it reads, and the
        ceiling read afresh (the daemon may have raised its limit since)."""
        self._now = now
        if self._fixed_ceiling is None:
            self.ceiling = default_ceiling()

    def stat(self, pid: int) -> bytes | None:
        entry = self._open.get(pid)
        if entry is not None:
            try:
                data = os.pread(int(entry[0]), STAT_SIZE, 0)
            except OSError:
                data = None  # that process ended (ESRCH): the number may be another's now
            if data:
                entry[2] = self._now
                return data
            self._drop(pid)
        try:
            fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            data = os.pread(fd, STAT_SIZE, 0)
        except OSError:
            os.close(fd)
            return None
        if fd >= self.ceiling or not data:
            os.close(fd)  # near the descriptor limit: read by path from now on
        else:
            self._open[pid] = [fd, -1, self._now]
        return data

    def children(self, pid: int, tid: int) -> bytes | None:
        entry = self._open.get(pid) if tid == pid else None
        if entry is None:
            return super().children(pid, tid)
        fd = int(entry[1])
        if fd < 0:
            try:
                fd = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            if fd >= self.ceiling:
                try:
                    return os.read(fd, CHILDREN_SIZE)
                except OSError:
                    return None
                finally:
                    os.close(fd)
            entry[1] = fd
        try:
            return os.pread(fd, CHILDREN_SIZE, 0)
        except OSError:
            self._drop(pid)
            return None

    def sweep(self, now: float) -> int:
        """Close what no pass read since the previous sweep, once per ``horizon``; returns
        how many entries went."""
        if now - self._swept < self.horizon:
            return 0
        stale = [pid for pid, e in self._open.items() if e[2] < self._swept]
        for pid in stale:
            self._drop(pid)
        self._swept = now
        return len(stale)

    def forget(self, pid: int) -> None:
        self._drop(pid)

    def close(self) -> None:
        for pid in list(self._open):
            self._drop(pid)

    def _drop(self, pid: int) -> None:
        entry = self._open.pop(pid, None)
        if entry is None:
            return
        for fd in (int(entry[0]), int(entry[1])):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
