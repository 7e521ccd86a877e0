"""Pre-initialised wasm starts (the fork server, ``supervisord_qnx/wasm/forkserver.py``)
through the real daemon, run in this test's process (so the daemon's pid, the workers'
parent, is ``os.getpid()``).

Attach-before-tenant-code cannot be shown by the tenant itself (its first line comes
after attachment either way), so the worker's test hook (``PROBE_ENV`` in its
environment) writes ``/proc/self/cgroup`` and its leaf tag to a file right before it
calls the runner's ``main``: what it saw then is what the module starts under.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest
import trio

from supervisord_qnx.partition import cgroupfs as fs
from supervisord_qnx.wasm.forkserver import PROBE_ENV
from tests import cgroup_helpers as cg
from tests.conftest import REPO, ConfigDir, pid_alive

pytestmark = pytest.mark.integration

HEARTBEAT = REPO / "config" / "wasm" / "heartbeat.wat"
RUN = uuid.uuid4().hex[:6]  # per session: the portable backend's tag lookup is system-wide


def heartbeat(cfg: ConfigDir, name: str, probe: Path) -> None:
    cfg.tenant(
        name,
        f"""
        memory = {{ max = "128MiB" }}
        restart = {{ policy = "on-failure", backoff_initial = 0.01, backoff_max = 0.05 }}
        [[worker]]
        name = "w"
        wasm = "{HEARTBEAT}"
        env = {{ {PROBE_ENV} = "{probe}" }}
        """,
    )


async def first_beat(log: Path, after: int = 0, timeout: float = 15.0) -> None:
    """Wait until the log holds more than ``after`` beat lines."""
    with trio.fail_after(timeout):
        while True:
            if log.exists() and log.read_text(errors="replace").count("beat ") > after:
                return
            await trio.sleep(0.01)


def ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[1])


async def wait_gone(pid: int, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while pid_alive(pid):
            await trio.sleep(0.02)


async def exercise(cfg: ConfigDir, start_daemon, name: str, **daemon_opts) -> dict:
    """Start, check, kill -9, restart, stop, shut down; returns what the probe saw."""
    probe = cfg.root / "probe.json"
    heartbeat(cfg, name, probe)
    d = await start_daemon(**daemon_opts)
    sup = d.daemon.supervisor
    log = cfg.worker_log(name, "w-0")
    await first_beat(log)
    w = await d.wait_for(f"{name}:w-0", lambda w: w["state"] == "running")
    server = sup.launchers.forkserver_pid
    assert server is not None and pid_alive(server)
    assert ppid(w["pid"]) == os.getpid()  # the daemon's child, not the server's
    assert os.getsid(w["pid"]) == w["pid"]  # its own session: stop signals its group
    seen = json.loads(probe.read_text())
    assert seen["pid"] == w["pid"]
    if daemon_opts.get("backend", "portable") == "portable":
        # The backend's rlimit (RLIMIT_DATA = 2 x the partition's 128 MiB), applied by W.
        limits = Path(f"/proc/{w['pid']}/limits").read_text().splitlines()
        (data,) = [line for line in limits if line.startswith("Max data size")]
        assert data.split()[3:5] == [str(256 << 20)] * 2, data
    # The backend finds it in its leaf (portable: by the tag in /proc/<pid>/environ).
    assert w["pid"] in d.daemon.backend.pids(w["partition"], "w-0")

    # Its end is the daemon's to see: kill -9 -> restarted with a new pid.
    beats = log.read_text().count("beat ")
    os.kill(w["pid"], signal.SIGKILL)
    again = await d.wait_for(
        f"{name}:w-0", lambda x: x["state"] == "running" and x["pid"] != w["pid"]
    )
    assert again["restarts"] == 1 and again["exit_reason"] == "signal:SIGKILL"
    await first_beat(log, after=beats)
    assert sup.launchers.forkserver_pid == server  # one server serves every start

    stopped = await d.call("stop", tenant=name, wait=True)
    assert stopped[0]["state"] == "stopped"
    await wait_gone(again["pid"])

    d.daemon.request_shutdown()
    with trio.fail_after(30):
        await d.daemon.stopped.wait()
    await wait_gone(server)  # no fork server left behind
    return seen


async def test_prefork_portable(cfg: ConfigDir, start_daemon) -> None:
    seen = await exercise(cfg, start_daemon, f"pre-{RUN}")
    # As the accounting reads it (/proc/self/environ), before the runner's main.
    assert seen["tag"] == f"tenants/pre-{RUN}:w-0"


async def test_prefork_cgroup1_attaches_before_the_runner(cfg: ConfigDir, start_daemon) -> None:
    cg.require_cgroup1()
    name = f"pre1-{RUN}"
    probe = cfg.root / "probe.json"
    heartbeat(cfg, name, probe)
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.unique_instance("prefork"))
    log = cfg.worker_log(name, "w-0")
    await first_beat(log)
    w = await d.wait_for(f"{name}:w-0", lambda w: w["state"] == "running")
    leaf = f"/{name}/{fs.LEAF_PREFIX}w-0"
    # Both before tenant code (the probe) and while it runs (/proc), in every hierarchy.
    for text in (
        json.loads(probe.read_text())["cgroup"],
        Path(f"/proc/{w['pid']}/cgroup").read_text(),
    ):
        memory = [line for line in text.splitlines() if ":memory:" in line]
        assert memory and memory[0].endswith(leaf), text
    assert ppid(w["pid"]) == os.getpid()
    assert d.daemon.supervisor.launchers.forkserver_pid is not None
    assert w["pid"] in d.daemon.backend.pids(w["partition"], "w-0")


async def test_prefork_cgroup1_full_cycle(cfg: ConfigDir, start_daemon) -> None:
    cg.require_cgroup1()
    await exercise(
        cfg, start_daemon, f"pre1c-{RUN}", backend="cgroup1", cgroup_root=cg.unique_instance("pf")
    )


async def test_prefork_off_uses_the_plain_runner(cfg: ConfigDir, start_daemon) -> None:
    name = f"plain-{RUN}"
    probe = cfg.root / "probe.json"
    heartbeat(cfg, name, probe)
    d = await start_daemon(wasm_prefork=False)
    await first_beat(cfg.worker_log(name, "w-0"))
    w = await d.wait_for(f"{name}:w-0", lambda w: w["state"] == "running")
    assert d.daemon.supervisor.launchers.forkserver_pid is None
    assert not probe.exists()  # the hook lives only in the fork server's worker path
    cmdline = Path(f"/proc/{w['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"supervisord_qnx.wasm.runner" in cmdline


async def test_a_dead_fork_server_is_replaced_on_the_next_start(
    cfg: ConfigDir, start_daemon
) -> None:
    name = f"crash-{RUN}"
    heartbeat(cfg, name, cfg.root / "probe.json")
    d = await start_daemon()
    sup = d.daemon.supervisor
    log = cfg.worker_log(name, "w-0")
    await first_beat(log)
    first = await d.wait_for(f"{name}:w-0", lambda w: w["state"] == "running")
    old = sup.launchers.forkserver_pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    await wait_gone(old)  # reaped by the daemon, not left a zombie
    assert pid_alive(first["pid"])  # a worker outlives the server that forked it
    await d.call("restart", tenant=name, wait=True)
    w = await d.wait_for(f"{name}:w-0", lambda w: w["state"] == "running")
    assert w["pid"] != first["pid"]
    with trio.fail_after(10):
        while sup.launchers.forkserver_pid in (None, old):
            await trio.sleep(0.02)
    assert ppid(w["pid"]) == os.getpid()
    text = (cfg.log_dir / "wasm-forkserver.log").read_text()
    assert text.count("ready") == 2


async def test_portable_accounting_counts_and_limits_a_preforked_worker(
    cfg: ConfigDir, start_daemon
) -> None:
    # The sampler finds the worker by its tag; a runner's resident size (~20 MiB) is far
    # above this partition's max, so being seen means being killed at the limit.
    name = f"small-{RUN}"
    cfg.tenant(
        name,
        f"""
        memory = {{ max = "12MiB" }}
        restart = {{ policy = "never" }}
        [[worker]]
        name = "w"
        wasm = "{HEARTBEAT}"
        [worker.limits]
        memory = "64KiB"
        """,
    )
    d = await start_daemon()
    w = await d.wait_for(f"{name}:w-0", lambda w: w["state"] not in ("starting", "running"))
    assert w["exit_reason"] == "memory-limit"
    assert d.daemon.supervisor.launchers.forkserver_pid is not None
