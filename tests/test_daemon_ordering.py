"""``after`` and the restart rules on the real daemon (in-process under trio, portable
backend): real worker processes, the real control socket, the daemon's own events.

The ordering is read from the daemon's event sequence numbers, as a user following
``events`` sees it; durations are measured on this machine with generous bounds (the
machine is shared: each bound is half or less of what the broken behaviour takes)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisord_qnx.control.rpc import ErrorCode, RpcError
from tests.conftest import ConfigDir, pid_alive, worker_py

pytestmark = pytest.mark.integration

BEAT = worker_py("import time\nwhile True:\n    time.sleep(0.1)\n")
# Ignores SIGTERM from its first instruction on: `trap ''` sets SIG_IGN, which the exec
# keeps, so the stop has to wait out stop_timeout and SIGKILL. Once the process shows
# `sleep` as its name, the trap is in place.
STUBBORN = '["sh", "-c", "trap \'\' TERM; exec sleep 1000"]'


def tenant(cfg: ConfigDir, name: str, *, after: str = "", extra: str = "") -> None:
    cfg.tenant(
        name,
        f"""
        {f"after = [{after}]" if after else ""}
        {extra}
        [[worker]]
        name = "w"
        command = {BEAT}
        """,
    )


def seq_of(history: Any, worker: str, new: str) -> int:
    """Sequence number of the first state event that took ``worker`` to ``new``."""
    for e in history:
        if e["kind"] == "state" and e["worker"] == worker and e["new"] == new:
            return int(e["seq"])
    raise AssertionError(f"no event took {worker} to {new}")


async def test_after_chain_starts_in_order_and_stops_in_reverse(
    cfg: ConfigDir, start_daemon
) -> None:
    # Files load alphabetically and autostart launches every start at once, so without
    # the ordering c, b and a would all be `starting` before any of them runs.
    tenant(cfg, "c", after='"b"')
    tenant(cfg, "b", after='"a"')
    tenant(cfg, "a")
    tenant(cfg, "x")  # ordered with nobody
    d = await start_daemon()
    status = await d.call("status")
    assert {w["name"]: w["state"] for w in status} == dict.fromkeys(
        ["a:w-0", "b:w-0", "c:w-0", "x:w-0"], "running"
    )
    history = list(d.daemon.events.history)
    assert seq_of(history, "a:w-0", "running") < seq_of(history, "b:w-0", "starting")
    assert seq_of(history, "b:w-0", "running") < seq_of(history, "c:w-0", "starting")

    pids = [w["pid"] for w in status]
    assert await d.call("shutdown") == "shutting down"
    with trio.fail_after(30):
        await d.daemon.stopped.wait()
    history = list(d.daemon.events.history)
    assert seq_of(history, "c:w-0", "stopped") < seq_of(history, "b:w-0", "stopping")
    assert seq_of(history, "b:w-0", "stopped") < seq_of(history, "a:w-0", "stopping")
    assert not [p for p in pids if pid_alive(p)]


async def test_a_tenant_after_one_that_does_not_come_up_stays_stopped(
    cfg: ConfigDir, start_daemon
) -> None:
    cfg.tenant(
        "db",
        """
        [[worker]]
        name = "w"
        command = ["/nonexistent/db-server"]
        """,
    )
    tenant(cfg, "api", after='"db"')
    tenant(cfg, "web", after='"api"')
    d = await start_daemon()
    assert (await d.worker("db:w-0"))["state"] == "fatal"
    for name in ("api:w-0", "web:w-0"):
        w = await d.worker(name)
        assert (w["state"], w["pid"]) == ("stopped", None), w
    blocked = await d.call("events", kind="start-blocked")
    assert [(e["tenant"], e["after"]) for e in blocked] == [("api", "db"), ("web", "api")]
    assert blocked[0]["reason"] == "db:w-0 is fatal: spawn-failed: no such program: " + (
        "/nonexistent/db-server"
    )
    assert blocked[1]["reason"].startswith("not started: it starts after 'db'")

    # `after` orders, it does not require: with db down and nobody starting it, an
    # operator's start of api starts it.
    started = await d.call("start", tenant="api", wait=True)
    assert started[0]["state"] == "running"


async def test_start_gives_up_when_the_tenant_it_waits_for_fails(
    cfg: ConfigDir, start_daemon, nursery: trio.Nursery, tmp_path: Path
) -> None:
    # db is on its way up for a while (a restart waiting out its stop_timeout), and its
    # program is gone by the time it starts again: it ends fatal while api waits for it.
    program = tmp_path / "db-server"
    program.write_text("#!/bin/sh\ntrap '' TERM\nexec sleep 1000\n")
    program.chmod(0o755)
    cfg.tenant(
        "db",
        f"""
        [[worker]]
        name = "w"
        command = ["{program}"]
        stop_timeout = 2
        """,
    )
    tenant(cfg, "api", after='"db"', extra="autostart = false")
    d = await start_daemon()
    old = await d.wait_for("db:w-0", lambda w: _comm(w["pid"]) == "sleep")
    nursery.start_soon(lambda: d.call("restart", tenant="db"))
    await d.wait_for("db:w-0", lambda w: w["state"] == "stopping")
    program.unlink()
    with pytest.raises(RpcError) as info:
        await d.call("start", tenant="api", wait=True)
    assert info.value.code == ErrorCode.INVALID_STATE
    assert info.value.message.startswith(
        "tenant 'api' was not started: it starts after 'db', which did not come up "
        "(db:w-0 is fatal: spawn-failed: no such program: "
    )
    assert (await d.worker("api:w-0"))["state"] == "stopped"
    assert not pid_alive(old["pid"])


def _comm(pid: int | None) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.mark.parametrize(("count", "stop_timeout"), [(10, 2.0), (50, 1.0)])
async def test_independent_tenants_stop_concurrently(
    cfg: ConfigDir, start_daemon, count: int, stop_timeout: float
) -> None:
    for i in range(count):
        cfg.tenant(
            f"t{i:02d}",
            f"""
            [[worker]]
            name = "w"
            command = {STUBBORN}
            stop_timeout = {stop_timeout}
            """,
        )
    d = await start_daemon()
    with trio.fail_after(30):
        while True:
            status = await d.call("status")
            if all(w["state"] == "running" and _comm(w["pid"]) == "sleep" for w in status):
                break
            await trio.sleep(0.05)
    pids = [w["pid"] for w in status]
    t0 = time.monotonic()
    await d.call("shutdown")
    with trio.fail_after(count * stop_timeout + 30):
        await d.daemon.stopped.wait()
    took = time.monotonic() - t0
    sequential = count * stop_timeout
    print(f"\nshutdown of {count} tenants ignoring SIGTERM, stop_timeout {stop_timeout}: "
          f"{took:.2f} s (one after another: {sequential:.0f} s)")  # fmt: skip
    assert took < 0.5 * sequential
    assert took >= stop_timeout  # each of them did wait out its stop_timeout
    assert not [p for p in pids if pid_alive(p)]
    stopped = [e for e in d.daemon.events.history if e["kind"] == "state" and e["new"] == "stopped"]
    assert {e["exit_reason"] for e in stopped} == {"stopped (signal:SIGKILL)"}


async def test_a_worker_killed_after_a_healthy_run_restarts_at_once(
    cfg: ConfigDir, start_daemon
) -> None:
    # backoff_initial = backoff_max = 5 s: any delay at all would be 5 s, far above what
    # a spawn takes even on a loaded machine; a run of 5 s or more is healthy.
    tenant(
        cfg,
        "steady",
        extra='restart = { policy = "always", backoff_initial = 5, backoff_max = 5 }',
    )
    d = await start_daemon()
    w = await d.wait_for("steady:w-0", lambda w: (w["uptime"] or 0) >= 5.2, timeout=30)
    os.kill(w["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    new = await d.wait_for(
        "steady:w-0", lambda n: n["state"] == "running" and n["pid"] != w["pid"], timeout=15
    )
    took = time.monotonic() - t0
    print(f"\nrestart after SIGKILL of a healthy run: {took * 1000:.1f} ms (backoff 5 s)")
    assert took < 2.5
    [restart] = await d.call("events", kind="restart")
    assert (restart["worker"], restart["after"]) == ("steady:w-0", 0.0)

    # Killed again at once: a short run, the start of a crash loop: it waits its backoff.
    os.kill(new["pid"], signal.SIGKILL)
    await d.wait_for("steady:w-0", lambda n: n["state"] == "backoff")
    await trio.sleep(1.0)
    after = await d.worker("steady:w-0")
    assert (after["state"], after["pid"]) == ("backoff", None)
    await d.call("stop", tenant="steady")
