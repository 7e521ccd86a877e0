"""The daemon's own process tree, read downwards from known roots through
``/proc/<pid>/task/<tid>/children``: what the portable backend needs to know about a
worker's leaf, at a cost proportional to the tenant's processes, not to the machine's.

Why not a ``/proc`` scan (``accounting.snapshot``)? A scan reads ``/proc/<pid>/stat`` of
every process on the machine and the environment of each of the daemon's descendants: at
1000 workers (with their 1000 log writers, and whatever else runs there) about 3000 and
2000 reads, 0.1-0.3 s of CPU on the loaded CI machine, paid after every worker's exit
and four times a second by the memory sampler (docs/benchmarks.md, issue 14). The tree
below a worker is almost always the worker alone: a read of its ``stat`` and of its
``children`` list.

Who can be in a worker's leaf: the worker's main process and its descendants while it
runs; after it ended, its descendants were re-parented to the daemon (a child subreaper,
``supervise/reaper.py``), so they are the daemon's children that it did not start (the
*orphans*) and their descendants. Both are the daemon's descendants, the only processes
the scan would count as ours as well (``PortableBackend._ours``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from supervisord_qnx.partition import accounting
from supervisord_qnx.partition.procfiles import PATHS, PathReads


def info(pid: int, files: PathReads = PATHS) -> tuple[accounting.ProcInfo, int] | None:
    """A live (not zombie) process's figures and its thread count; ``None`` when gone.
    ``files``: how ``/proc`` is read (``procfiles.ProcFiles``: kept open, for the sampler)."""
    stat = files.stat(pid)
    if stat is None:
        return None
    # Fields after the parenthesised command name; the name itself may hold ") ". Split
    # only as far as the last field read (rss): the sampler parses this for every process.
    rest = stat[stat.rfind(b")") + 2 :].split(maxsplit=22)
    if len(rest) < 22 or rest[0] == b"Z":
        return None
    proc = accounting.ProcInfo(
        pid, int(rest[1]), int(rest[21]) * accounting.PAGE_SIZE, int(rest[11]) + int(rest[12])
    )
    return proc, int(rest[17])


def children(pid: int, threads: int = 0, files: PathReads = PATHS) -> list[int]:
    """The direct children of ``pid``: forked by any of its threads (each thread has its
    own list). ``threads`` 1: only the main thread's (one read instead of a listing)."""
    tids: Iterable[int | str]
    if threads == 1:
        tids = (pid,)
    else:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return []
    out: list[int] = []
    for tid in tids:
        text = files.children(pid, int(tid))
        if text:
            out.extend(int(p) for p in text.split())
    return out


def subtree(
    roots: Iterable[int],
    root_ok: Callable[[accounting.ProcInfo], bool] | None = None,
    files: PathReads = PATHS,
) -> Iterator[tuple[accounting.ProcInfo, int]]:
    """Each live process of the trees below ``roots`` (the roots included), with its depth
    (0 for a root); a zombie and what is below it is left out, as a scan leaves it out,
    and so is a root that ``root_ok`` refuses (a recorded pid taken by another process
    since) with everything below it."""
    stack = [(pid, 0) for pid in roots]
    seen: set[int] = set()
    while stack:
        pid, depth = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        got = info(pid, files)
        if got is None:
            continue
        proc, threads = got
        if depth == 0 and root_ok is not None and not root_ok(proc):
            continue
        yield proc, depth
        # Right after the stat read of the same process: what procfiles relies on.
        stack.extend((child, depth + 1) for child in children(pid, threads, files))


def members(roots: Iterable[int], exact: str) -> list[int]:
    """The processes below ``roots`` that belong to the leaf tagged ``exact``: each one
    carrying that tag, and everything below it (``accounting.members``' rule, applied to
    these trees only)."""
    found: set[int] = set()
    stack = list(roots)
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        got = info(pid)
        if got is None:
            continue
        _, threads = got
        below = children(pid, threads)
        if accounting.read_tag(pid) == exact:
            found.add(pid)
            found.update(proc.pid for proc, _ in subtree(below))
        else:
            stack.extend(below)
    found.discard(os.getpid())
    return sorted(found)
