"""Give the C heap's free pages back to the system once a burst of work is over.

Starting (or restarting) workers allocates and frees a lot in a short time: spawn
requests, environments, status rows, the worker threads' own allocations. glibc keeps
what is freed in its arenas (the main heap and one per thread that allocated), resident,
for the next allocation, and returns only the top of the main heap by itself. The
daemon's RSS then carries megabytes it no longer uses (issue 14: daemon RSS at N, and
per running worker; docs/performance.md). ``malloc_trim(0)`` releases every whole free
page of every arena (glibc >= 2.8 madvises the inside of the heap too).

``Trimmer.changed`` is an event listener (``EventBus.listeners``): every worker event
marks the heap dirty; ``run`` trims once things have been quiet for ``QUIET`` seconds,
and every ``4 * QUIET`` seconds while a crash loop keeps them busy. A trim takes well
under a millisecond here; nothing is trimmed while nothing happens. Where there is no
glibc (musl, QNX), ``trim`` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

import trio

QUIET = 0.25  # seconds without an event before trimming


def _find_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_trim = _find_trim()


def available() -> bool:
    return _trim is not None


# glibc's mallopt parameter for the most arenas its threads may use (malloc.h M_ARENA_MAX).
_M_ARENA_MAX = -8
# The main heap and three more. glibc's default is 8 per CPU (16 here): a burst of starts
# runs on up to 40 worker threads, each allocating in an arena of its own until there are
# 16, and each arena keeps the top of its heap resident once the burst is over (passwd
# look-ups, cgroup file reads: free, but not returned: malloc_trim does not shrink the top
# of a thread's arena). At N = 100 running that was 0.5 to 0.7 MiB of the daemon's RSS
# (issue 14). Not two: with one arena beside the main heap, two threads spawning at once
# put one of them on the main heap, waiting for the event loop's allocations (restart
# after SIGKILL was 0.6 to 1.7 ms slower); with three, the few threads of a restart each
# find one of their own (restart p50 unchanged in paired runs, see the commit).
DAEMON_ARENAS = 4


def limit_arenas(count: int = DAEMON_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``count`` for this process; False where there is no
    glibc, or when the operator chose with ``MALLOC_ARENA_MAX`` (left as they set it).
    Call before the threads start: an arena, once made, stays."""
    if _trim is None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # libc is loaded: no library search
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, count))


def trim() -> bool:
    """Return the C heap's free pages to the system; True if anything was released."""
    return bool(_trim is not None and _trim(0))


class Trimmer:
    def __init__(self) -> None:
        self._dirty = trio.Event()
        self.trims = 0

    def changed(self, *_: object) -> None:
        self._dirty.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if _trim is None:
            return
        while True:
            await self._dirty.wait()
            # Quiet for QUIET seconds, or 4 * QUIET seconds after the first change at most
            # (a crash loop is never quiet): a burst of starts is trimmed once, after it.
            with trio.move_on_after(QUIET * 4):
                while True:
                    self._dirty = trio.Event()
                    with trio.move_on_after(QUIET):
                        await self._dirty.wait()
                        continue
                    break
            self._dirty = trio.Event()
            trim()
            self.trims += 1
