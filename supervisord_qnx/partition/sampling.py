"""How often user-space accounting looks at each partition: by its headroom.

The portable backend enforces ``memory.max`` by sampling (``portable.py``): it reads the
memory of a partition's processes and kills them above the max. Reading every worker
every ``sample_interval`` (0.25 s) costs two small /proc reads per worker, 8,000 a
second at 1000 workers: 7 % of a CPU with every worker idle (issue 14 asks for 1 %).

Which partitions need looking at that often? One whose use is near a figure it must not
cross unseen (its max, or the pressure threshold ``max - reserved``) or grows fast
towards it; not one that uses a tenth of its max and has not grown. So each
partition is due again after ``sample_interval`` times a factor of its headroom at its
last sample, with its growth since the sample before counted once more (a partition
that grew by a quarter of its max in one interval is treated as already a quarter
closer):

==================================  =======
projected use / nearest figure       factor
==================================  =======
below 1/16                           16
below 1/8                            8
below 1/4                            4
below 1/2                            2
from 1/2                             1
==================================  =======

A partition without any figure (its peak is all it reports) is due every 16 intervals.
A new partition, a partition whose figures changed, and a partition a worker was just
started in (and each limited partition above it) are due at the next sample. Between
passes the sampler sleeps until the first partition is due (``until_due``), not one
interval: a hurry wakes it (``PortableBackend.watch``).

What this trades, stated plainly: a process that jumps from a small fraction of its
partition's max to above it between two samples is seen up to 16 intervals late (4 s
at the default, for a partition that used less than a sixteenth of its max; 2 s below
an eighth) instead of 1. How far it can get meanwhile does not change: every process
runs under ``RLIMIT_DATA`` at twice its partition's max, the kernel's own ceiling on
overshoot between samples; what changes is that a process reaching that ceiling first
sees its allocation fail (and usually ends by itself) before the accounting kills its
partition with ``memory-limit``. Measured at 1000 idle workers, each alone in a
partition with a 64 MiB max (bench/bench_supervisor.py's idle CPU, on the shared 2-core
machine at load averages 14-20): the daemon's CPU went from 12.9 % of one core to
1.2-1.4 %.

Pure bookkeeping, no I/O; the caller holds whatever lock guards it.
"""

from __future__ import annotations

from collections.abc import Iterable

# (fraction of the nearest figure below which, factor), loosest first.
STEPS = ((1 / 16, 16), (1 / 8, 8), (1 / 4, 4), (1 / 2, 2))
# The factor for a partition with no figure to watch (only its peak is reported).
UNLIMITED = 16


def factor(projected: int, figure: int | None) -> int:
    """How many sample intervals until a partition using ``projected`` bytes (its use
    plus its last growth), whose nearest figure above is ``figure``, is due again."""
    if figure is None:
        return UNLIMITED
    if figure <= 0:
        return 1
    for fraction, steps in STEPS:
        if projected < figure * fraction:
            return steps
    return 1


class SampleSchedule:
    """When each partition is next due, and what it used at its last sample."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}  # partition -> monotonic time it is due
        self._last: dict[str, int] = {}  # partition -> bytes at its last sample
        self._hurried: set[str] = set()  # due at the next look, whatever _next says
        # Hurried and looked at once: looked at again one interval later, whatever that
        # look saw. A process caught as it starts (mid-exec) shows next to nothing, and
        # its growth is only known from a second look: without it, a partition sampled
        # at zero just after a spawn would wait for the slowest turn (16 intervals).
        self._fresh: set[str] = set()

    def due(self, paths: Iterable[str], now: float) -> set[str]:
        """Those of ``paths`` due now: never sampled, hurried, or their time came (or
        comes within half an interval: the next look is a whole interval away)."""
        soon = now + self.interval / 2
        due = {p for p in paths if p in self._hurried or self._next.get(p, 0.0) <= soon}
        self._fresh |= due & self._hurried
        self._hurried -= due
        return due

    def sampled(self, path: str, usage: int, figure: int | None, now: float) -> None:
        """``path`` was just sampled at ``usage`` bytes; ``figure`` is the nearest limit
        above it that must not be crossed unseen (``None``: the partition has none)."""
        previous = self._last.get(path, usage)
        self._last[path] = usage
        projected = usage + max(0, usage - previous)
        if path in self._fresh:
            self._fresh.discard(path)
            self._next[path] = now + self.interval
            return
        self._next[path] = now + self.interval * factor(projected, figure)

    def until_due(self, paths: Iterable[str], now: float) -> float:
        """Seconds from ``now`` until the first of ``paths`` is due (``due``'s half
        interval early included); 0 when one is due now or hurried. O(partitions), for
        once per pass: the sampler sleeps that long instead of waking every interval."""
        if self._hurried:
            return 0.0
        first = min((self._next.get(p, 0.0) for p in paths), default=now + self.interval)
        return max(0.0, first - self.interval / 2 - now)

    def hurry(self, paths: Iterable[str]) -> None:
        """Sample these partitions at the next look (new figures, a new process), even
        if a sample under way now reschedules them."""
        self._hurried.update(paths)

    def forget(self, path: str) -> None:
        self._next.pop(path, None)
        self._last.pop(path, None)
        self._hurried.discard(path)
        self._fresh.discard(path)
