"""Regression tests for the faults that used to stop or freeze the whole daemon through one
worker's lifecycle: a long crash loop, stop/start races in backoff and during a stop, a
partition removed from outside, a backend call that fails, a FIFO at a log path.

Each drives the real daemon (in-process, real processes and sockets; cgroup v1 where the
fault is a cgroup one) and asserts on what an operator sees: answers on the socket, states,
exit reasons, pids in /proc and the kernel's files."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisord_qnx.control.client import AsyncClient
from supervisord_qnx.partition.backend import BackendError
from tests import conftest
from tests.cgroup_helpers import CgroupRoot
from tests.conftest import ConfigDir, pid_alive, pipelined, worker_py
from tests.test_daemon_cgroup import leaf_dirs, read_int

pytestmark = pytest.mark.integration

SLEEPER = '["sleep", "1000"]'
# Ignores SIGTERM, so a stop has to wait out stop_timeout and SIGKILL it.
STUBBORN = worker_py(
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('up', flush=True)\n"
    "time.sleep(1000)\n"
)


def tenant(cfg: ConfigDir, name: str, command: str, extra: str = "", worker: str = "") -> None:
    cfg.tenant(
        name,
        f"""
        memory = {{ max = "128MiB" }}
        {extra}
        [[worker]]
        name = "w"
        command = {command}
        {worker}
        """,
    )


async def test_crash_loop_past_1024_restarts_keeps_the_daemon(cfg: ConfigDir, start_daemon) -> None:
    # Under the intensity limit for ever, with the streak never reset (each run is shorter
    # than backoff_max): the old doubling reached 2**1024 after 1,024 restarts and an
    # OverflowError ended the daemon. The smallest float as initial delay keeps every
    # delay near zero up to there, so the test gets there in seconds, not hours.
    tenant(
        cfg,
        "flap",
        '["false"]',
        "restart = { policy = 'always', backoff_initial = 5e-324, backoff_max = 1.0, "
        "max_restarts = 100000, window = 0.001 }",
    )
    tenant(cfg, "calm", SLEEPER)
    d = await start_daemon()
    calm = await d.worker("calm:w-0")
    w = await d.wait_for("flap:w-0", lambda w: w["restarts"] > 1030, timeout=120)
    assert w["state"] in ("backoff", "starting", "running")
    assert w["exit_reason"] == "exit:1"
    assert await d.call("ping") == "pong"
    assert (await d.worker("calm:w-0"))["pid"] == calm["pid"]


async def test_stop_and_start_in_one_nursery_during_backoff(cfg: ConfigDir, start_daemon) -> None:
    tenant(
        cfg,
        "loop",
        '["false"]',
        "restart = { policy = 'always', backoff_initial = 0.5, backoff_max = 0.5, "
        "max_restarts = 1000 }",
    )
    d = await start_daemon()
    for _ in range(5):
        await d.wait_for("loop:w-0", lambda w: w["state"] == "backoff")
        async with AsyncClient(d.socket) as c, trio.open_nursery() as n:
            n.start_soon(lambda: c.call("stop", tenant="loop"))
            n.start_soon(lambda: c.call("start", tenant="loop"))
        # Whatever order they ran in, one more stop must settle it: nothing fires later.
        stopped = await d.call("stop", tenant="loop")
        assert stopped[0]["state"] == "stopped" and stopped[0]["pid"] is None
        await trio.sleep(0.7)  # past the backoff: a stray timer would restart it
        w = await d.worker("loop:w-0")
        assert (w["state"], w["pid"]) == ("stopped", None)
        await d.call("start", tenant="loop")
    assert await d.call("ping") == "pong"


async def test_pipelined_stop_start_stop_in_backoff_ends_stopped(
    cfg: ConfigDir, start_daemon
) -> None:
    tenant(
        cfg,
        "loop",
        '["false"]',
        "restart = { policy = 'always', backoff_initial = 0.3, backoff_max = 0.3, "
        "max_restarts = 1000 }",
    )
    d = await start_daemon()
    await d.wait_for("loop:w-0", lambda w: w["state"] == "backoff")
    calls: list[tuple[str, dict[str, Any]]] = [
        ("stop", {"tenant": "loop"}),
        ("start", {"tenant": "loop"}),
    ] * 3
    calls.append(("stop", {"tenant": "loop", "wait": True}))
    answers = await trio.to_thread.run_sync(pipelined, d.socket, calls)
    assert all(a is not None and a[2] is None for a in answers), answers  # all answered, no error
    await trio.sleep(0.5)
    w = await d.worker("loop:w-0")
    assert (w["state"], w["pid"]) == ("stopped", None)


async def test_start_during_a_slow_stop_is_answered_and_a_later_stop_holds(
    cfg: ConfigDir, start_daemon
) -> None:
    tenant(cfg, "stub", STUBBORN, worker="stop_timeout = 1.5")
    d = await start_daemon()
    w = await d.wait_for("stub:w-0", lambda w: w["state"] == "running")
    await d.call("stop", tenant="stub", wait=False)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            for _ in range(2):
                n.start_soon(lambda: d.call("start", tenant="stub", wait=True))
    after = await d.worker("stub:w-0")
    assert after["state"] == "running" and after["pid"] != w["pid"]
    assert not pid_alive(w["pid"])
    stopped = await d.call("stop", tenant="stub")
    assert stopped[0]["state"] == "stopped"
    await trio.sleep(0.3)
    assert (await d.worker("stub:w-0"))["state"] == "stopped"


async def test_fifo_at_a_log_path_fails_that_worker_only(cfg: ConfigDir, start_daemon) -> None:
    tenant(cfg, "piped", SLEEPER)
    tenant(cfg, "calm", SLEEPER)
    cfg.worker_log("piped", "w-0").parent.mkdir(parents=True)
    os.mkfifo(cfg.worker_log("piped", "w-0"))
    with trio.fail_after(20):
        d = await start_daemon()
        w = await d.worker("piped:w-0")
        assert w["state"] == "fatal"
        assert "is not a regular file" in w["exit_reason"]
        assert w["exit_reason"].startswith("spawn-failed: ")
        assert (await d.worker("calm:w-0"))["state"] == "running"
        assert await d.call("ping") == "pong"


async def test_symlink_at_a_log_path_is_refused(
    cfg: ConfigDir, start_daemon, tmp_path: Path
) -> None:
    tenant(cfg, "linked", SLEEPER)
    target = tmp_path / "elsewhere.txt"
    target.write_text("untouched\n")
    cfg.worker_log("linked", "w-0").parent.mkdir(parents=True)
    cfg.worker_log("linked", "w-0").symlink_to(target)
    d = await start_daemon()
    w = await d.worker("linked:w-0")
    assert w["state"] == "fatal" and "is not a regular file" in w["exit_reason"]
    assert target.read_text() == "untouched\n"


class FailOnce:
    """The real backend, with one named call raising once (for the first call whose
    arguments mention ``about``): a backend that fails."""

    def __init__(self, real: Any, method: str, exc: Exception, about: str = "") -> None:
        self._real, self._method, self._exc, self._about = real, method, exc, about
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name != self._method:
            return attr

        def once(*args: Any, **kwargs: Any) -> Any:
            if not self.failed and self._about in repr(args):
                self.failed = True
                raise self._exc
            return attr(*args, **kwargs)

        return once


@pytest.mark.parametrize(
    "method,exc,reason",
    [
        ("kill_leaf", RuntimeError("injected"), "internal: RuntimeError: injected"),
        ("spawn", BackendError("injected spawn failure"), "backend: injected spawn failure"),
    ],
)
async def test_a_failing_backend_call_fails_one_worker(
    cfg: ConfigDir,
    start_daemon,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    exc: Exception,
    reason: str,
) -> None:
    wrappers: list[FailOnce] = []

    def make_backend(config: Any) -> Any:
        wrappers.append(FailOnce(real_make_backend(config), method, exc, about="victim"))
        return wrappers[-1]

    real_make_backend = conftest.make_backend
    monkeypatch.setattr(conftest, "make_backend", make_backend)
    # `kill_leaf` runs when a run's leaf is cleared: after an exit that left a process in
    # it (the background sleep; an empty leaf needs no clearing). `spawn` runs at start.
    tenant(cfg, "victim", '["sh", "-c", "sleep 30 & sleep 0.2; exit 3"]', "autostart = true")
    tenant(cfg, "calm", SLEEPER)
    d = await start_daemon()
    calm = await d.worker("calm:w-0")
    w = await d.wait_for("victim:w-0", lambda w: w["state"] == "fatal")
    assert w["exit_reason"] == reason and w["pid"] is None
    assert wrappers[0].failed
    fatal = [e for e in await d.call("events", kind="fatal") if e["worker"] == "victim:w-0"]
    assert fatal and fatal[-1]["exit_reason"] == reason
    # The daemon and the neighbour carry on; the operator can start the victim again.
    assert (await d.worker("calm:w-0"))["pid"] == calm["pid"]
    again = await d.call("start", tenant="victim", wait=True)
    assert again[0]["state"] in ("running", "backoff", "exited")
    assert await d.call("ping") == "pong"


async def test_partition_removed_during_backoff_is_recreated(
    cg: CgroupRoot,
    cfg: ConfigDir,
    start_daemon,
    tmp_path: Path,
) -> None:
    # Fails its first run (so it waits in backoff), then stays up.
    once = f"[ -e {tmp_path}/ran ] && exec sleep 1000; touch {tmp_path}/ran; exit 2"
    cfg.tenant(
        "gone",
        f"""
        memory = {{ max = "64MiB" }}
        pids = 32
        restart = {{ policy = "always", backoff_initial = 1.5, backoff_max = 1.5 }}
        [[worker]]
        name = "w"
        command = ["sh", "-c", "{once}"]
        """,
    )
    cfg.tenant("calm", f'[[worker]]\nname = "w"\ncommand = {SLEEPER}\n')
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    calm = await d.worker("calm:w-0")
    await d.wait_for("gone:w-0", lambda w: w["state"] == "backoff")
    # An administrator (or a cleanup script) removes the tenant's cgroups from outside.
    for c in ("memory", "cpu", "pids"):
        for leaf in leaf_dirs(cg, "tenants/gone", "w-0"):
            if leaf.exists() and str(leaf).startswith(str(cg.by_ctrl[c])):
                leaf.rmdir()
        cg.dir(c, "tenants", "gone").rmdir()
    w = await d.wait_for("gone:w-0", lambda w: w["state"] == "running" and w["restarts"] == 1)
    # Back in a partition that carries its limits again.
    mem = cg.dir("memory", "tenants", "gone")
    assert read_int(mem / "memory.limit_in_bytes") == 64 << 20
    assert read_int(cg.dir("pids", "tenants", "gone", "pids.max")) == 32
    # (On cgroup v1 the worker's exec shim moves itself into the leaf just after the
    # spawn returns; give it that moment.)
    procs = mem / "@w-0" / "cgroup.procs"
    with trio.fail_after(5):
        while str(w["pid"]) not in procs.read_text().split():
            await trio.sleep(0.01)
    kinds = [e["kind"] for e in await d.call("events", limit=1000)]
    assert "partition-recreated" in kinds
    assert (await d.worker("calm:w-0"))["pid"] == calm["pid"]
    assert await d.call("ping") == "pong"


async def test_backend_watcher_failure_is_contained_and_it_comes_back(
    cfg: ConfigDir, start_daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The portable backend's watcher is what kills a partition at its max: after it
    # failed once, it must be running again (the hog still dies at its limit).
    real_make_backend = conftest.make_backend
    monkeypatch.setattr(
        conftest,
        "make_backend",
        lambda config: FailOnce(real_make_backend(config), "watch", RuntimeError("injected")),
    )
    hog = worker_py(
        "import time\nchunks = []\n"
        "while True:\n    chunks.append(bytearray(8 << 20)); time.sleep(0.05)\n"
    )
    tenant(cfg, "calm", SLEEPER)
    cfg.tenant(
        "hog",
        f"""
        memory = {{ max = "96MiB" }}
        restart = {{ policy = "never" }}
        [[worker]]
        name = "grow"
        command = {hog}
        """,
    )
    d = await start_daemon()
    w = await d.wait_for("hog:grow-0", lambda w: w["state"] == "exited", timeout=30)
    assert w["exit_reason"] == "memory-limit"
    failed = await d.call("events", kind="backend-watch-failed")
    assert failed and failed[0]["error"] == "RuntimeError: injected"
    assert (await d.worker("calm:w-0"))["state"] == "running"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def test_waiting_out_a_backoff_or_a_stop_timeout_does_not_spin(
    cfg: ConfigDir, start_daemon
) -> None:
    # The daemon runs in this process: its CPU time is ours. A timer wait that returned
    # at once (a deadline on the wrong clock) would burn a whole core while it waits.
    tenant(
        cfg,
        "slow",
        '["false"]',
        "restart = { policy = 'always', backoff_initial = 3, backoff_max = 3 }",
    )
    tenant(cfg, "stub", STUBBORN, worker="stop_timeout = 3")
    d = await start_daemon()
    await d.wait_for("slow:w-0", lambda w: w["state"] == "backoff")
    await d.wait_for("stub:w-0", lambda w: w["state"] == "running")
    with trio.fail_after(15):  # its SIGTERM handler is in place once it said so
        while "up" not in cfg.worker_log("stub", "w-0").read_text():
            await trio.sleep(0.02)
    await d.call("stop", tenant="stub", wait=False)
    assert (await d.worker("stub:w-0"))["state"] == "stopping"
    before = _cpu_seconds()
    await trio.sleep(1.0)
    used = _cpu_seconds() - before
    assert used < 0.2, f"{used:.2f} s of CPU in 1 s of waiting"
    assert (await d.worker("slow:w-0"))["state"] == "backoff"
    assert (await d.worker("stub:w-0"))["state"] == "stopping"


# Makes the daemon its tracer, then signals itself: the daemon's wait sees a ptrace
# stop of its child, which used to be taken for the worker's end (and a replacement
# started beside the stopped copy).
TRACEME = worker_py(
    "import ctypes, os, signal, time\n"
    "print('traceme', ctypes.CDLL(None).ptrace(0, 0, None, None), flush=True)\n"
    "os.kill(os.getpid(), signal.SIGUSR1)\n"
    "print('resumed', flush=True)\n"
    "time.sleep(1000)\n"
)


async def test_a_worker_that_makes_the_daemon_its_tracer_is_not_taken_for_dead(
    cfg: ConfigDir, start_daemon
) -> None:
    tenant(cfg, "tracee", TRACEME, worker="stop_timeout = 1")
    d = await start_daemon()
    w = await d.wait_for("tracee:w-0", lambda w: w["state"] == "running")
    log = cfg.worker_log("tracee", "w-0")
    proc_status = Path(f"/proc/{w['pid']}/status")

    def state() -> str:
        return proc_status.read_text().split("State:")[1].split()[0]

    with trio.fail_after(30):
        while "traceme 0\n" not in (log.read_text() if log.exists() else "") or state() != "t":
            await trio.sleep(0.05)
    await trio.sleep(1.0)  # what the daemon makes of the stop has had time to happen
    # Still the same worker, running as far as the daemon knows, no replacement.
    (now,) = await d.call("status", tenant="tracee")
    assert (now["state"], now["pid"], now["restarts"]) == ("running", w["pid"], 0)
    assert state() == "t"  # stopped by the tracer relation, alive
    # A stop still ends it (SIGKILL at stop_timeout: a traced stop ignores SIGTERM).
    await d.call("stop", tenant="tracee")
    (now,) = await d.call("status", tenant="tracee")
    assert now["state"] == "stopped" and not pid_alive(w["pid"])
