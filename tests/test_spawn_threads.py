"""The threads that spawn the daemon's children never end (supervise/spawnthreads.py).

To the kernel a process's parent, for ``PR_SET_PDEATHSIG``, is the thread that created
it: a worker that asked for a signal at its parent's death was killed when the idle
trio worker thread that spawned it ended, 10 s after each start."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from supervisord_qnx.supervise import spawnthreads
from supervisord_qnx.supervise.spawnthreads import SpawnThreads
from tests.conftest import ConfigDir, pid_alive


async def test_results_and_errors_come_back_from_threads_that_stay() -> None:
    pool = SpawnThreads(most=2)
    assert await pool.run(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ValueError, match="no such"):
        await pool.run(int, "no such")
    first = await pool.run(threading.get_native_id)
    await trio.sleep(0.05)
    # The same thread answers again: a single caller never needs a second one.
    assert await pool.run(threading.get_native_id) == first
    assert pool.threads == 1


async def test_a_burst_uses_at_most_most_threads_and_every_job_runs() -> None:
    pool = SpawnThreads(most=3)
    ids: list[int] = []

    def job() -> None:
        time.sleep(0.02)
        ids.append(threading.get_native_id())

    async with trio.open_nursery() as nursery:
        for _ in range(12):
            nursery.start_soon(pool.run, job)
    assert len(ids) == 12
    assert len(set(ids)) == pool.threads == 3


async def test_a_cancelled_caller_still_waits_for_its_spawn() -> None:
    """What a spawn starts must not be lost: cancelling the caller neither abandons the
    job nor loses its result, as with ``trio.to_thread.run_sync``."""
    pool = SpawnThreads(most=1)
    done = threading.Event()
    got: list[str] = []

    def slow() -> str:
        time.sleep(0.2)
        done.set()
        return "spawned"

    with trio.move_on_after(0.05) as scope:
        got.append(await pool.run(slow))
        await trio.sleep(0)  # the cancellation is delivered here, after the result
    assert scope.cancelled_caught
    assert done.is_set() and got == ["spawned"]


async def test_spawns_queued_behind_stuck_ones_get_threads_of_their_own() -> None:
    """An exec that never returns (a hung network filesystem) holds its thread; with every
    thread so held, a queued spawn still runs once they count as stuck."""
    pool = SpawnThreads(most=2, stuck_after=0.2)
    hung = threading.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(pool.run, hung.wait)
        got: list[str] = []
        done = trio.Event()

        async def queued() -> None:
            got.append(await pool.run(lambda: "spawned"))
            done.set()

        try:
            await trio.sleep(0.05)  # both threads taken
            began = time.monotonic()
            nursery.start_soon(queued)
            with trio.move_on_after(5):
                await done.wait()
            waited = time.monotonic() - began
            assert got == ["spawned"]
            assert 0.15 <= waited < 2, waited  # after it counted them stuck, not before
            assert pool.threads == 3
        finally:
            hung.set()  # the held threads come back (the nursery waits for them)


# trio's worker threads end after this long idle (trio/_core/_thread_cache.py).
TRIO_IDLE_TIMEOUT = 10.0


@pytest.mark.integration
async def test_a_worker_with_a_parent_death_signal_keeps_running(
    cfg: ConfigDir, start_daemon
) -> None:
    """``setpriv --pdeathsig KILL`` (as ``bwrap --die-with-parent`` or Go's Pdeathsig): the
    worker runs on past the time a trio thread that spawned it would have ended."""
    cfg.tenant(
        "pd",
        """
        [[worker]]
        name = "w"
        command = ["setpriv", "--pdeathsig", "KILL", "sleep", "1000"]
        """,
    )
    d = await start_daemon(backend="portable")
    first = await d.wait_for("pd:w-0", lambda w: w["state"] == "running" and w["pid"])
    await trio.sleep(TRIO_IDLE_TIMEOUT + 2)
    now = (await d.call("status", tenant="pd"))[0]
    assert (now["state"], now["pid"], now["restarts"]) == ("running", first["pid"], 0), now
    assert pid_alive(first["pid"])
    assert spawnthreads.POOL.threads >= 1
