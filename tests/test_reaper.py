"""The child reaper with real processes: a SIGCHLD collects the worker that ended (found
by the kernel's word, not by asking every worker) and still reaps the orphans a worker
left to the daemon as child subreaper."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

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


def _zombie(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2] == "Z"


async def test_on_exit_calls_back_with_the_status_later_or_at_once(nursery: trio.Nursery) -> None:
    """``on_exit`` is ``wait`` without a task: the callback gets the raw status when the
    child ends, or at once when it ended before anyone asked."""
    reaper = ChildReaper()
    await nursery.start(reaper.run)
    got: dict[int, int] = {}
    done = trio.Event()

    def record(pid: int) -> Callable[[int], None]:
        def callback(status: int) -> None:
            got[pid] = status
            done.set()

        return callback

    ended = _spawn(reaper, ["sh", "-c", "exit 5"])
    with trio.fail_after(10):
        while not _zombie(ended):  # ended, not collected: it is ours, not an orphan
            await trio.sleep(0.01)
    reaper.on_exit(ended, record(ended))
    assert os.WEXITSTATUS(got[ended]) == 5  # at once
    later = _spawn(reaper, ["sh", "-c", "sleep 0.3; exit 6"])
    reaper.on_exit(later, record(later))
    assert later not in got
    with trio.fail_after(10):
        await done.wait()
        while later not in got:
            await trio.sleep(0.01)
    assert os.WEXITSTATUS(got[later]) == 6
    assert not os.path.exists(f"/proc/{later}")  # collected, not left a zombie


async def test_a_failing_exit_callback_does_not_stop_the_reaping(nursery: trio.Nursery) -> None:
    reaper = ChildReaper()
    await nursery.start(reaper.run)

    def broken(status: int) -> None:
        raise RuntimeError(f"a watcher's fault ({status})")

    first = _spawn(reaper, ["sh", "-c", "sleep 0.1"])
    reaper.on_exit(first, broken)
    second = _spawn(reaper, ["sh", "-c", "sleep 0.5; exit 3"])
    with trio.fail_after(10):
        status = await reaper.wait(second)
    assert os.WEXITSTATUS(status) == 3
    with trio.fail_after(10):  # the broken watcher's child was collected all the same
        while os.path.exists(f"/proc/{first}"):
            await trio.sleep(0.01)


async def test_a_sigchld_after_the_reaper_stopped_listening_finds_a_python_handler() -> None:
    # A child that ends as the daemon's reaper closes its signal receiver: the C level
    # may catch the SIGCHLD under the receiver's handler and Python handle it after the
    # default was put back, which CPython reports as an unraisable "ignored due to race
    # condition" (it failed an in-process daemon test). The reaper leaves a Python
    # handler to go back to, so that case has one to call.
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(ChildReaper().run)
            nursery.cancel_scope.cancel()
        handler = signal.getsignal(signal.SIGCHLD)
        assert callable(handler), handler
        signal.raise_signal(signal.SIGCHLD)  # handled, nothing raised
    finally:
        signal.signal(signal.SIGCHLD, previous)
