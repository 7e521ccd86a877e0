"""User-space accounting of a partition's processes, for backends without a kernel
partition to ask (portable on any Unix, qnx for memory).

A worker's processes are found two ways, because either alone misses some:

* the ``/proc`` parent links down from the worker's main pid, which finds every
  descendant as long as the chain is unbroken;
* an environment tag ``SUPERVISORD_QNX_LEAF=<partition>:<leaf>`` set at spawn
  and inherited by every descendant, which finds the ones whose parent died
  (re-parented to the daemon as subreaper, or to init) even after they
  called ``setsid``. A process that scrubs its environment *and* escapes its
  parent evades this; that is why the kernel backends exist.

Reading ``/proc/<pid>/environ`` of every process costs a syscall per process,
so a full scan happens only where the parent walk cannot be enough: at stop
(to kill everything) and at each accounting sample, bounded by the
configured ``sample_interval``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

TAG = "SUPERVISORD_QNX_LEAF"
# Which daemon started the process: a digest of its state_dir (supervise/leftovers.py),
# in the environment beside TAG. Two daemons may have partitions of the same names; a
# tag counts for a daemon only beside its own owner value (``read_tag``).
OWNER = "SUPERVISORD_QNX_OWNER"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def tag_value(partition: str, leaf: str) -> str:
    return f"{partition}:{leaf}"


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    rss: int  # bytes
    cpu_ticks: int  # utime + stime


def _read_stat(pid: int) -> ProcInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes().decode("ascii", "replace")
    except OSError:
        return None
    # Fields after the parenthesised command name; the name itself may hold ") ".
    rest = stat[stat.rfind(")") + 2 :].split()
    if len(rest) < 22 or rest[0] == "Z":
        return None
    ppid = int(rest[1])
    ticks = int(rest[11]) + int(rest[12])
    rss = int(rest[21]) * PAGE_SIZE
    return ProcInfo(pid, ppid, rss, ticks)


def all_pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def read_tag(pid: int, owner: str | None = None) -> str | None:
    """The process's leaf tag; with ``owner``, only if the process also carries that
    owner value (``None`` for another daemon's process of the same partition names)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    key = TAG.encode() + b"="
    owner_item = None if owner is None else f"{OWNER}={owner}".encode()
    tag, owned = None, owner_item is None
    for item in env.split(b"\0"):
        if item.startswith(key):
            tag = item[len(key) :].decode("utf-8", "replace")
        elif item == owner_item:
            owned = True
    return tag if owned else None


def snapshot() -> dict[int, ProcInfo]:
    """Every live (non-zombie) process on the machine."""
    out = {}
    for pid in all_pids():
        info = _read_stat(pid)
        if info is not None:
            out[pid] = info
    return out


def in_subtree(tag: str, path: str) -> bool:
    """Whether a tag names a leaf of partition ``path`` or of any partition below it."""
    return tag.startswith((f"{path}:", f"{path}/"))


def members(
    procs: dict[int, ProcInfo],
    roots: Iterable[int],
    match: Callable[[str], bool] | None = None,
    tags: Mapping[int, str | None] | None = None,
) -> set[int]:
    """The processes that belong to a worker or partition: ``roots`` and their descendants,
    plus every process whose tag satisfies ``match``. ``tags``: the processes' tags read
    once for several calls (``read_tag`` per process otherwise)."""
    found = {pid for pid in roots if pid in procs}
    if match is not None:
        own = os.getpid()
        for pid in procs:
            if pid not in found and pid != own:
                tag = read_tag(pid) if tags is None else tags.get(pid)
                if tag is not None and match(tag):
                    found.add(pid)
    children: dict[int, list[int]] = {}
    for info in procs.values():
        children.setdefault(info.ppid, []).append(info.pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


T = TypeVar("T")


class SharedScan(Generic[T]):
    """Concurrent callers share one ``/proc`` scan, never an older one: each gets the
    result of a scan that *started after it asked* (so it sees every process that
    existed when it asked), and a scan already under way that started too early is
    waited out, then one new scan serves everyone who queued meanwhile.

    Why: a scan reads ``/proc/<pid>/stat`` of every process on the machine. A shutdown
    of 100 workers asked for 100 scans at once (each stop checks its worker's leaf), a
    second of a 2-core machine's CPU; shared, they are two or three."""

    def __init__(self, scan: Callable[[], T]) -> None:
        self._scan = scan
        self._cond = threading.Condition()
        self._running = False
        self._started = 0  # scans started so far
        self._done = 0  # the newest scan finished with a result
        self._result: T | None = None

    def get(self) -> T:
        with self._cond:
            need = self._started + 1  # the first scan to start from now on
            while True:
                if self._done >= need:
                    assert self._result is not None
                    return self._result
                if not self._running:
                    self._running = True
                    self._started += 1
                    mine = self._started
                    break
                self._cond.wait()
        result: T | None = None
        try:
            result = self._scan()
        finally:
            with self._cond:
                self._running = False
                if result is not None:  # a failed scan leaves the waiters to start another
                    self._done, self._result = mine, result
                self._cond.notify_all()
        return result
