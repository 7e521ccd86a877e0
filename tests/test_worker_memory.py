"""What a running worker costs the daemon (issue 14: RSS slope per running worker; the
figures are bench/bench_supervisor.py's). Its exit and its log writer's are told by the
reaper's callbacks, not by tasks waiting for them: a task per running worker and per log
writer was a few KiB of the daemon's memory each. Here, through the real daemon: running
workers add no tasks, and their exits (a SIGKILL, a stop) are still seen."""

from __future__ import annotations

import os
import signal

import pytest
import trio
import trio.lowlevel

from tests.conftest import ConfigDir

pytestmark = pytest.mark.integration

N = 8


def _tasks() -> int:
    """Every task of this trio run (the daemon runs inside the test's)."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count, nurseries = 0, list(root.child_nurseries)
    while nurseries:
        nursery = nurseries.pop()
        count += len(nursery.child_tasks)
        for task in nursery.child_tasks:
            nurseries.extend(task.child_nurseries)
    return count


async def test_running_workers_add_no_tasks_and_their_exits_are_still_seen(
    cfg: ConfigDir, start_daemon
) -> None:
    for i in range(N):
        cfg.tenant(
            f"t{i}",
            """
            autostart = false
            restart = { policy = "always", backoff_initial = 0.01, backoff_max = 0.05 }
            [[worker]]
            name = "w"
            command = ["sleep", "1000"]
            """,
        )
    d = await start_daemon()
    await trio.sleep(0.2)  # start-up's own tasks come and go
    before = _tasks()
    for i in range(N):
        await d.call("start", tenant=f"t{i}", wait=True)
    running = [await d.wait_for(f"t{i}:w-0", lambda w: w["state"] == "running") for i in range(N)]
    # Waiting for an exit was a task per worker and another per log writer (2 N more).
    assert _tasks() - before < N // 2, (before, _tasks())
    await trio.sleep(0.3)  # past backoff_max: a healthy run, restarted at once
    os.kill(running[0]["pid"], signal.SIGKILL)
    again = await d.wait_for(
        "t0:w-0", lambda w: w["state"] == "running" and w["pid"] != running[0]["pid"]
    )
    assert again["exit_reason"] == "signal:SIGKILL"
    for i in range(N):
        await d.call("stop", tenant=f"t{i}", wait=True)
    for i in range(N):
        w = await d.worker(f"t{i}:w-0")
        assert w["state"] == "stopped" and w["pid"] is None, w
