"""Portable memory sampling by headroom (partition/sampling.py): a partition far below
its max is looked at less often, one near it or growing at every interval, and a worker
that sat idle far below its max and then jumps above it is still killed at the max."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest
import trio

from supervisord_qnx.partition.sampling import UNLIMITED, SampleSchedule, factor
from tests.conftest import ConfigDir, worker_py

MiB = 1 << 20


@pytest.mark.parametrize(
    ("used", "expected"),
    [(0, 16), (3 * MiB, 16), (4 * MiB, 8), (7 * MiB, 8), (8 * MiB, 4), (15 * MiB, 4),
     (16 * MiB, 2), (31 * MiB, 2), (32 * MiB, 1), (63 * MiB, 1), (80 * MiB, 1)],
)  # fmt: skip
def test_the_factor_follows_the_headroom_to_the_nearest_figure(used: int, expected: int) -> None:
    assert factor(used, 64 * MiB) == expected


def test_a_partition_without_figures_is_looked_at_for_its_peak_only_now_and_then() -> None:
    assert factor(10 * MiB, None) == UNLIMITED


def test_a_partition_far_below_its_max_is_due_again_only_after_several_intervals() -> None:
    s = SampleSchedule(0.25)
    assert s.due(["a", "b"], 100.0) == {"a", "b"}  # never sampled: due at once
    s.sampled("a", 6 * MiB, 64 * MiB, 100.0)  # below 1/8 of its max
    s.sampled("b", 40 * MiB, 64 * MiB, 100.0)  # above half of it
    assert s.due(["a", "b"], 100.25) == {"b"}
    assert s.due(["a"], 101.75) == set()
    assert s.due(["a"], 102.0) == {"a"}  # 8 intervals


def test_growth_counts_as_headroom_already_used() -> None:
    s = SampleSchedule(0.25)
    s.sampled("a", 1 * MiB, 64 * MiB, 100.0)
    # 7 MiB is still below an eighth of 64 MiB, but it grew by 6 MiB since: treated
    # as 13 MiB, a fifth of the max.
    s.sampled("a", 7 * MiB, 64 * MiB, 104.0)
    assert s.due(["a"], 104.5) == set()
    assert s.due(["a"], 105.0) == {"a"}  # 4 intervals, not 8


def test_a_hurry_outlasts_a_sample_that_was_under_way() -> None:
    s = SampleSchedule(0.25)
    s.sampled("a", 1 * MiB, 64 * MiB, 100.0)
    assert s.due(["a"], 100.25) == set()
    s.hurry(["a"])  # a worker was just started in it, while a sample ran...
    s.sampled("a", 1 * MiB, 64 * MiB, 100.25)  # ...which then rescheduled it far away
    assert s.due(["a"], 100.5) == {"a"}
    s.sampled("a", 1 * MiB, 64 * MiB, 100.5)
    assert s.due(["a"], 100.75) == {"a"}  # the hurried look's follow-up (below)
    s.sampled("a", 1 * MiB, 64 * MiB, 100.75)
    assert s.due(["a"], 101.0) == set()  # then the slow schedule again


def test_a_new_process_caught_at_nothing_is_looked_at_again_one_interval_later() -> None:
    # Sampled mid-exec, a new worker shows next to nothing: far below its max, which
    # alone would put the partition 16 intervals away. Its growth is known only from a
    # second look, so that comes one interval after the hurried one.
    s = SampleSchedule(0.25)
    s.sampled("a", 0, 64 * MiB, 100.0)
    s.hurry(["a"])
    assert s.due(["a"], 100.25) == {"a"}
    s.sampled("a", 0, 64 * MiB, 100.25)
    assert s.due(["a"], 100.5) == {"a"}
    s.sampled("a", 40 * MiB, 64 * MiB, 100.5)  # it grew: now the headroom rules
    assert s.due(["a"], 100.75) == {"a"}
    s.sampled("a", 1 * MiB, 64 * MiB, 100.75)  # and it shrank back: the slow turn
    assert s.due(["a"], 101.0) == set()


def test_a_forgotten_partition_starts_afresh() -> None:
    s = SampleSchedule(0.25)
    s.sampled("a", 1 * MiB, 64 * MiB, 100.0)
    s.forget("a")
    assert s.due(["a"], 100.25) == {"a"}


# Idles at some 10 MiB (below an eighth of its 128 MiB max) long enough to be on the
# slow schedule, then takes 160 MiB at once and holds it: above the max, below
# RLIMIT_DATA (2 x max).
JUMPS = """
import time
print("idle", flush=True)
time.sleep(IDLE)
hog = bytearray(160 << 20)
for i in range(0, len(hog), 4096):
    hog[i] = 1
print("jumped", flush=True)
time.sleep(1000)
"""


@pytest.mark.integration
async def test_a_worker_that_jumps_from_far_below_its_max_is_still_killed_at_it(
    cfg: ConfigDir, start_daemon
) -> None:
    # The tests' sample_interval is 0.05 s: the slow schedules are 0.4 and 0.8 s, idled
    # through more than twice before the jump.
    command = worker_py("IDLE = 2.0\n" + JUMPS)
    cfg.tenant(
        "jump",
        f"""
        memory = {{ max = "128MiB" }}
        restart = {{ policy = "never" }}
        [[worker]]
        name = "w"
        command = {command}
        """,
    )
    d = await start_daemon()
    w = await d.wait_for("jump:w-0", lambda w: w["state"] == "exited", timeout=30)
    assert w["exit_reason"] == "memory-limit"
    # It idled first (killed during or after the jump, whichever the sample saw).
    assert cfg.worker_log("jump", "w-0").read_text().startswith("idle\n")


def test_until_due_is_the_time_to_the_first_partition_due() -> None:
    s = SampleSchedule(0.25)
    assert s.until_due(["a"], 100.0) == 0.0  # never sampled: due now
    s.sampled("a", 1 * MiB, 64 * MiB, 100.0)  # due at 104.0 (16 intervals)
    s.sampled("b", 6 * MiB, 64 * MiB, 100.0)  # due at 102.0 (8 intervals)
    # due() takes a partition half an interval early: 101.875 for b.
    assert s.until_due(["a", "b"], 100.0) == pytest.approx(1.875)
    assert s.until_due(["a"], 100.0) == pytest.approx(3.875)
    s.hurry(["a"])
    assert s.until_due(["a", "b"], 100.0) == 0.0


# A worker that only sleeps: some 10 MiB, far below its partition's max.
SLEEPS = "import time\ntime.sleep(1000)\n"


class _Passes:
    """Counts the portable sampler's passes (it still runs each one)."""

    def __init__(self, backend: Any) -> None:
        self.count = 0
        self._inner = backend._sample_pass
        backend._sample_pass = self

    def __call__(self) -> Any:
        self.count += 1
        return self._inner()


def _spawn_sleeper(backend: Any, path: str, max_bytes: int) -> Any:
    from supervisord_qnx.partition.tree import Partition

    backend.create(Partition(path, memory_max=max_bytes))
    return _spawn_sleeper_in(backend, path)


def _spawn_sleeper_in(backend: Any, path: str) -> Any:
    from supervisord_qnx.partition.backend import SpawnRequest

    return backend.spawn(
        SpawnRequest(
            partition=path,
            leaf="w-0",
            argv=[sys.executable, "-c", SLEEPS],
            cwd=None,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )


async def test_the_sampler_sleeps_while_nothing_is_due_and_a_new_worker_or_figure_wakes_it() -> (
    None
):
    from supervisord_qnx.partition.backend import BackendEvent, EventKind
    from supervisord_qnx.partition.portable import PortableBackend
    from supervisord_qnx.partition.tree import Partition, PartitionTree

    # 0.5 s intervals: a partition far below its max is due every 8 s.
    backend = PortableBackend(sample_interval=0.5)
    backend.use_orphan_source(list)  # the test process is no subreaper: no orphans
    proc = _spawn_sleeper(backend, "t/a", 1 << 30)
    backend.create(Partition("t/b", memory_max=1 << 30))  # no process in it yet
    procs = [proc]
    passes = _Passes(backend)
    events: list[BackendEvent] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.watch, PartitionTree(), events.append)
            # Its first passes see it start (hurried); then it is far below its max.
            with trio.fail_after(30):
                while backend._schedule._last.get("t/a", 0) < 4 * MiB:
                    await trio.sleep(0.1)
            await trio.sleep(1.0)
            settled = passes.count
            # Three seconds, six intervals: not one pass is due in them. (One is let
            # through: under a heavy load the settling above can end a pass late; a
            # sampler waking every interval would run six.)
            await trio.sleep(3.0)
            assert passes.count - settled <= 1, "passes ran with nothing due"
            # A worker started meanwhile is looked at from the next interval, not when
            # its partition's (or any) slow schedule comes round.
            due_at = min(backend._schedule._next["t/a"], backend._schedule._next["t/b"])
            procs.append(_spawn_sleeper_in(backend, "t/b"))
            with trio.fail_after(30):
                while not backend._usage.get("t/b"):
                    await trio.sleep(0.05)
            assert time.monotonic() < due_at - 1.0, "the new worker waited for its turn"
            await trio.sleep(1.0)
            due_at = backend._schedule._next["t/a"]
            # New figures (its reserve puts the pressure threshold below what it uses):
            # they apply from the next pass, not from its slow schedule's turn.
            backend.update_limits(
                Partition("t/a", memory_max=1 << 30, memory_reserved=(1 << 30) - 4 * MiB)
            )
            with trio.fail_after(30):
                while not any(e.kind is EventKind.MEMORY_PRESSURE for e in events):
                    await trio.sleep(0.05)
            # (With no wake-up it would come half an interval before ``due_at``.)
            assert time.monotonic() < due_at - 1.0, "the new figure waited for its turn"
            nursery.cancel_scope.cancel()
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
