"""Giving the C heap's free pages back (supervisord_qnx/memtrim.py): a trim releases what
was freed, and the daemon's trimmer trims once after a burst of events, and still
(rate-bounded) while events never stop."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio
import trio.testing

from supervisord_qnx import memtrim

# Allocates 64 MiB in 64 KiB blocks below glibc's mmap threshold (so they come from the
# heap, as the daemon's do), frees all but every 64th (whole free pages between the
# survivors, which glibc keeps resident by itself), and prints RssAnon before and
# after a trim.
FRAGMENT = (
    "import ctypes, pathlib\n"
    "from supervisord_qnx import memtrim\n"
    "libc = ctypes.CDLL(None)\n"
    "libc.malloc.restype = ctypes.c_void_p\n"
    "libc.free.argtypes = [ctypes.c_void_p]\n"
    "libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: keep 64 KiB blocks in the heap\n"
    "libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: no trimming of the top by free()\n"
    "blocks = [libc.malloc(65536) for _ in range(1024)]\n"
    "for b in blocks: ctypes.memset(b, 1, 65536)\n"
    "for i, b in enumerate(blocks):\n"
    "    if i % 64: libc.free(b)\n"
    "def anon():\n"
    "    for line in pathlib.Path('/proc/self/status').read_text().splitlines():\n"
    "        if line.startswith('RssAnon:'): return int(line.split()[1])\n"
    "before = anon()\n"
    "print(memtrim.trim(), before, anon())\n"
)


@pytest.mark.skipif(not memtrim.available(), reason="malloc_trim is glibc's")
def test_a_trim_gives_freed_heap_pages_back() -> None:
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENT], capture_output=True, text=True, timeout=60, check=True
    )
    released, before, after = out.stdout.split()
    # About 63 MiB was freed; most of it is whole pages between the survivors.
    assert released == "True", out
    assert int(before) - int(after) > 32 * 1024, out


async def test_a_burst_of_events_is_trimmed_once_after_it_goes_quiet(
    mock_clock: trio.testing.MockClock,
) -> None:
    trimmer = memtrim.Trimmer()
    async with trio.open_nursery() as nursery:
        await nursery.start(trimmer.run)
        await trio.testing.wait_all_tasks_blocked()
        assert trimmer.trims == 0  # nothing happened: nothing to trim
        for _ in range(10):  # events closer together than QUIET
            trimmer.changed()
            mock_clock.jump(memtrim.QUIET / 4)
            await trio.testing.wait_all_tasks_blocked()
        assert trimmer.trims == 0  # not during the burst
        mock_clock.jump(memtrim.QUIET)
        await trio.testing.wait_all_tasks_blocked()
        assert trimmer.trims == 1
        mock_clock.jump(memtrim.QUIET * 10)
        await trio.testing.wait_all_tasks_blocked()
        assert trimmer.trims == 1  # and not again while nothing happens
        nursery.cancel_scope.cancel()


async def test_events_that_never_stop_are_still_trimmed_now_and_then(
    mock_clock: trio.testing.MockClock,
) -> None:
    trimmer = memtrim.Trimmer()
    async with trio.open_nursery() as nursery:
        await nursery.start(trimmer.run)
        for _ in range(160):  # a crash loop: an event every QUIET / 4, for 40 QUIET
            trimmer.changed()
            mock_clock.jump(memtrim.QUIET / 4)
            await trio.testing.wait_all_tasks_blocked()
        # Every 4 QUIET at most, so about 10 trims; never one per event.
        assert 5 <= trimmer.trims <= 10
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(not memtrim.available(), reason="malloc arenas are glibc's")
def test_the_arena_cap_leaves_an_operators_malloc_arena_max_alone() -> None:
    """The daemon caps glibc's arenas (memtrim.limit_arenas) unless the operator set
    MALLOC_ARENA_MAX, which glibc has applied already and which is left as they chose."""
    code = "from supervisord_qnx import memtrim\nprint(memtrim.limit_arenas())\n"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    for extra, said in (({}, "True"), ({"MALLOC_ARENA_MAX": "8"}, "False")):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env={**env, **extra},
        )
        assert out.stdout.strip() == said, (extra, out)
