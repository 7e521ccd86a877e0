"""A memory probe for finding where the daemon's memory goes (docs/reliability.md,
"Where the daemon's memory goes"). Off unless ``SUPERVISORD_QNX_MEMPROBE=<dir>`` is set
when the daemon starts; then it costs nothing but that one environment look-up.

When on, a thread writes into ``<dir>`` every ``SUPERVISORD_QNX_MEMPROBE_INTERVAL``
seconds (default 10) one line of ``probe.jsonl`` (RSS, threads, the allocator's view
from ``mallinfo2``, Python's allocated blocks, the live objects counted by type) and,
with ``SUPERVISORD_QNX_MEMPROBE_FRAMES=N`` (N > 0), a ``tracemalloc`` snapshot
``snap-<seq>.pickle`` with N frames per allocation, to compare with
``Snapshot.compare_to(other, "traceback")``. tracemalloc slows every allocation down,
so the snapshots are a separate choice from the cheap figures.

A diagnostic for a developer's machine, not a feature: the files are the daemon's own
(mode 0600 under its umask) and nothing reads them back."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ENV_DIR = "SUPERVISORD_QNX_MEMPROBE"
ENV_INTERVAL = "SUPERVISORD_QNX_MEMPROBE_INTERVAL"
ENV_FRAMES = "SUPERVISORD_QNX_MEMPROBE_FRAMES"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo() -> dict[str, int]:
    """glibc's view of the heap (in bytes): ``arena`` obtained with brk/mmap for arenas,
    ``hblkhd`` in large mmap'ed blocks, ``uordblks`` in use, ``fordblks`` free but kept.
    Empty where there is no glibc ``mallinfo2`` (musl, QNX)."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _MallInfo2
    info = fn()
    return {f[0]: int(getattr(info, f[0])) for f in _MallInfo2._fields_}


def _proc_status() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmData", "RssAnon", "Threads"):
            out[key] = int(value.split()[0])
    return out


def _mappings() -> dict[str, int]:
    """Resident KiB by kind of mapping (/proc/self/smaps): ``heap`` (brk), ``file``, and
    anonymous ones by their size in MiB (``anon:8`` holds thread stacks, ``anon:64``
    and ``anon:<64`` glibc's per-thread arenas, ``anon:1`` pymalloc's arenas...)."""
    out: dict[str, int] = {}
    kind = ""
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                first = line.split(maxsplit=5)
                if "-" in first[0] and len(first) >= 5 and not first[0].endswith(":"):
                    start, _, end = first[0].partition("-")
                    path = first[5].strip() if len(first) > 5 else ""
                    size = (int(end, 16) - int(start, 16)) >> 20
                    kind = "heap" if path == "[heap]" else ("file" if path else f"anon:{size}")
                elif first[0] == "Rss:":
                    out[kind] = out.get(kind, 0) + int(first[1])
    except OSError:
        return {}
    return {k: v for k, v in sorted(out.items()) if v}


def sample(top: int = 40) -> dict[str, Any]:
    import tracemalloc

    kinds = Counter(type(o).__qualname__ for o in gc.get_objects())
    traced = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else (0, 0)
    return {
        "t": time.time(),
        "status": _proc_status(),
        "threads_py": threading.active_count(),
        "blocks": sys.getallocatedblocks(),
        "traced": traced[0],
        "mallinfo": _mallinfo(),
        "mappings": _mappings(),
        "gc_counts": gc.get_count(),
        "objects": len(kinds),
        "types": dict(kinds.most_common(top)),
    }


def _run(directory: Path, interval: float, frames: int) -> None:
    import tracemalloc

    seq = 0
    while True:
        record = sample()
        record["seq"] = seq
        with (directory / "probe.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if frames:
            tracemalloc.take_snapshot().dump(str(directory / f"snap-{seq:04d}.pickle"))
        seq += 1
        time.sleep(interval)


def start_from_env() -> bool:
    """Start the probe if the environment asks for it; True if it did."""
    where = os.environ.get(ENV_DIR)
    if not where:
        return False
    import tracemalloc

    directory = Path(where)
    directory.mkdir(parents=True, exist_ok=True)
    frames = int(os.environ.get(ENV_FRAMES, "0"))
    if frames > 0:
        tracemalloc.start(frames)
    interval = float(os.environ.get(ENV_INTERVAL, "10"))
    threading.Thread(
        target=_run, args=(directory, interval, frames), name="memprobe", daemon=True
    ).start()
    return True
