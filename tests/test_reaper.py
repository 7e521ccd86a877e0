"""The child reaper with real processes: a SIGCHLD collects the worker that ended (found
by the kernel's word, not by asking every worker) and still reaps the orphans a worker
left to the daemon as child subreaper."""

from __future__ import annotations

import os
import signal
import subprocess

import trio

from supervisord_qnx.supervise.reaper import ChildReaper, become_subreaper
from tests.conftest import pid_alive


def _spawn(reaper: ChildReaper, argv: list[str]) -> int:
    with reaper.spawning():
        return reaper.adopt(subprocess.Popen(argv, start_new_session=True))


async def test_a_sigchld_collects_the_ended_worker_and_the_orphan_it_left(
    nursery: trio.Nursery,
) -> None:
    assert become_subreaper()
    reaper = ChildReaper()
    await nursery.start(reaper.run)
    sleepers = [_spawn(reaper, ["sleep", "30"]) for _ in range(20)]
    try:
        waits = {pid: trio.Event() for pid in sleepers}

        async def wait(pid: int) -> None:
            await reaper.wait(pid)
            waits[pid].set()

        for pid in sleepers:
            nursery.start_soon(wait, pid)
        # Exits 7 at once and leaves a grandchild that outlives it: an orphan of ours.
        worker = _spawn(reaper, ["sh", "-c", "sleep 0.3 & exit 7"])
        with trio.fail_after(10):
            status = await reaper.wait(worker)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
        with trio.fail_after(10):
            while reaper.orphans_reaped < 1:
                await trio.sleep(0.01)
        # Nobody else was collected meanwhile: the sleepers run, their waits go on.
        assert all(pid_alive(pid) and not waits[pid].is_set() for pid in sleepers)
    finally:
        for pid in sleepers:
            os.kill(pid, signal.SIGKILL)
    with trio.fail_after(10):
        for event in waits.values():
            await event.wait()
