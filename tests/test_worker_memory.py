"""What a running worker costs the daemon (issue 14: RSS slope per running worker; the
figures are bench/bench_supervisor.py's). Its exit and its log writer's are told by the
reaper's callbacks, not by tasks waiting for them: a task per running worker and per log
writer was a few KiB of the daemon's memory each. Here, through the real daemon: running
workers add no tasks, and their exits (a SIGKILL, a stop) are still seen."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from supervisord_qnx import memtrim
from tests.conftest import ConfigDir, wait_until
from tests.daemonproc import DaemonProc, ctl
from tests.test_import_cost import ctl_status_running

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


def test_a_configured_worker_that_never_restarted_keeps_no_queue_blocks() -> None:
    """Every configured worker has a lifecycle, running or not (issue 14: the daemon's
    RSS at N configured). Its action queue and its restart history used to be deques,
    and an empty deque reserves a 64-slot block: about 1.5 KiB per worker before any
    action or restart. The restart history still works once restarts happen."""
    import gc
    import tracemalloc

    from supervisord_qnx.config.model import TenantSpec
    from supervisord_qnx.exits import ExitReason
    from supervisord_qnx.supervise.policy import RestartTracker, Verdict
    from supervisord_qnx.supervise.worker import Lifecycle

    tenant = TenantSpec.model_validate({"name": "t", "worker": [{"name": "w", "command": ["x"]}]})
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [Lifecycle.for_worker(tenant.restart, tenant.worker[0]) for _ in range(200)]
        each = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert each < 800, each  # 1,870 bytes with the two deques, 405 without
    tracker = RestartTracker(tenant.restart.model_copy(update={"max_restarts": 2}))
    crash = ExitReason.parse("exit:1")
    verdicts = [tracker.decide(crash, now, uptime=0.0).verdict for now in (0, 1, 2)]
    assert verdicts == [Verdict.RESTART, Verdict.RESTART, Verdict.FATAL]
    tracker.reset()  # an operator start: a fresh try
    assert tracker.decide(crash, 3, uptime=0.0).verdict is Verdict.RESTART


def _malloc_arenas(pid: int) -> int:
    """glibc's arenas besides the main heap, in a process: each is a heap that glibc maps
    at an address aligned to its 64 MiB maximum size, its used part rw-p and the unused
    rest ---p up to the 64 MiB. Both are asked of a mapping: any anonymous mapping (a
    1 MiB block of Python's allocator, a thread's stack) may start on such an address
    by chance, and one did, in a CI run (4 counted where the daemon had 3)."""
    heap = 64 << 20
    spans = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) == 5:  # anonymous: no path
            lo, _, hi = fields[0].partition("-")
            spans.append((int(lo, 16), int(hi, 16), fields[1]))
    count = 0
    for i, (start, end, perms) in enumerate(spans):
        if perms != "rw-p" or start % heap:
            continue
        rest = spans[i + 1] if i + 1 < len(spans) else None
        whole = end - start == heap
        reserved = rest is not None and rest[0] == end and rest[2] == "---p"
        if whole or (reserved and rest is not None and rest[1] == start + heap):
            count += 1
    return count


@pytest.mark.skipif(not memtrim.available(), reason="malloc arenas are glibc's")
def test_the_daemons_threads_share_three_malloc_arenas_beside_the_main_heap(
    cfg: ConfigDir,
    daemon_procs: Callable[..., DaemonProc],
) -> None:
    """Tens of worker threads start workers and partitions; with glibc's default, each
    that allocated got an arena of its own (up to 8 per CPU), each keeping the top of its
    heap resident after the burst (issue 14: daemon RSS). The daemon caps them at four
    (memtrim.limit_arenas): the main heap and three more."""
    names = [f"t{i}" for i in range(32)]
    for name in names:
        cfg.tenant(name, '[[worker]]\nname = "w"\ncommand = ["sleep", "1000"]\n')
    cfg.write()
    d = daemon_procs()
    wanted = {f"{n}:w-0" for n in names}
    wait_until(lambda: ctl_status_running(cfg.socket) == wanted, 60, "every worker running")
    for name in names:  # a second burst of spawns and exits
        ctl(cfg.socket, "restart", name, check=True)
    wait_until(lambda: ctl_status_running(cfg.socket) == wanted, 60, "every worker running")
    assert _malloc_arenas(d.proc.pid) <= memtrim.DAEMON_ARENAS - 1, _malloc_arenas(d.proc.pid)


def _cancel_scopes() -> int:
    """Cancel scopes open now: those that have a cancel status. (Scopes that have
    exited may stay referenced for a while by trio's deadline heap, without one.)"""
    import gc

    gc.collect()
    return sum(
        isinstance(o, trio.CancelScope) and o._cancel_status is not None for o in gc.get_objects()
    )


async def test_a_worker_waiting_without_a_timer_holds_no_cancel_scope(
    cfg: ConfigDir, start_daemon
) -> None:
    """Every configured worker has a task that waits for something to do. Without a
    timer to wait for (stopped, or running with no watchdog), that wait has no cancel
    scope: one (with its cancel status) per worker was about 0.6 KiB of the daemon's
    memory each (issue 14). Timers still fire: a start timeout ends a worker that never
    says it is ready."""
    many = 40
    for i in range(many):
        cfg.tenant(
            f"t{i}",
            'autostart = false\n[[worker]]\nname = "w"\ncommand = ["sleep", "1000"]\n',
        )
    cfg.tenant(
        "slow",
        """
        autostart = false
        restart = { policy = "never" }
        [[worker]]
        name = "w"
        command = ["sleep", "1000"]
        ready = "notify"
        start_timeout = 0.5
        """,
    )
    d = await start_daemon()
    await trio.sleep(0.2)  # start-up's own scopes come and go
    for i in range(0, many, 2):  # half of them running, half stopped
        await d.call("start", tenant=f"t{i}", wait=True)
    for i in range(0, many, 2):
        await d.wait_for(f"t{i}:w-0", lambda w: w["state"] == "running")
    # The daemon's own scopes (server, listeners, ...) do not grow with the workers.
    assert _cancel_scopes() < many, _cancel_scopes()
    await d.call("start", tenant="slow")
    w = await d.wait_for("slow:w-0", lambda w: w["state"] not in ("stopped", "starting"))
    assert "start-timeout" in str(w["exit_reason"]), w
