"""The cgroup v1 backend through the real daemon: real kernel limits, real processes.

Each test roots its partitions under a unique ``cgroup_root`` (so tests, and a daemon an
operator runs on the same machine, never share a directory) and the ``cg`` fixture fails
the test if anything of ours is left under that root afterwards - after reaping it, so a
failing test does not leak processes or cgroups into the next one.

Assertions are on what an operator sees (``status``, ``partitions``, ``events`` over the
socket, the CLI's exit code and message) and on the kernel's own files. Without a
writable v1 memory hierarchy the tests skip with the probe's reason; under
``SUPERVISORD_QNX_REQUIRE_CGROUPS=1`` that skip fails where the hierarchy is writable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest
import trio

from supervisord_qnx.partition import cgroupfs as fs
from supervisord_qnx.partition.backend import BackendOptions
from supervisord_qnx.partition.cgroup_v2 import Cgroup2Backend
from supervisord_qnx.partition.cgroupfs import quota_for
from tests.cgroup_helpers import CgroupRoot
from tests.conftest import ConfigDir, cli_env, pid_alive, wait_until, worker_py
from tests.daemonproc import DAEMON, DaemonProc, ctl_status

pytestmark = pytest.mark.integration

MiB = 1 << 20

SLEEPER = '["sleep", "1000"]'


def read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def leaf_dirs(cg: CgroupRoot, partition: str, leaf: str) -> list[Path]:
    # A worker has a leaf of its own in the memory and cpu hierarchies only (cgroup_v1.py,
    # "Fewer directories"); in pids and cpuacct it sits in its partition's directory.
    return [cg.dir(c, *partition.split("/"), f"@{leaf}") for c in ("memory", "cpu")]


def find_partition(report: dict, path: str) -> dict:
    stack = [report["tree"]]
    while stack:
        node = stack.pop()
        if node["path"] == path:
            return dict(node)
        stack.extend(node["children"])
    raise KeyError(path)


# --------------------------------------------------------------------------- backend choice


async def test_auto_picks_cgroup1_and_shutdown_leaves_nothing(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    cfg.tenant(
        "alpha",
        f"""
        memory = {{ max = "64MiB" }}
        [[worker]]
        name = "w"
        command = {SLEEPER}
        """,
    )
    d = await start_daemon(backend="auto", cgroup_root=cg.name)
    assert (await d.call("version"))["backend"] == "cgroup1"
    w = await d.worker("alpha:w-0")
    assert w["state"] == "running"
    # The worker sits in its leaf (the spawn shim attaches it just after the daemon saw
    # the pid, before the program runs) and the partition carries the configured cap.
    pid = w["pid"]
    for leaf in leaf_dirs(cg, "tenants/alpha", "w-0"):
        wait_until(partial(lambda d: pid in fs.read_procs(d), leaf), 5, f"pid in {leaf}")
    assert read_int(cg.dir("memory", "tenants", "alpha", "memory.limit_in_bytes")) == 64 * MiB
    report = await d.call("partitions")
    assert report["backend"] == "cgroup1"
    alpha = find_partition(report, "tenants/alpha")
    assert str(cg.dir("memory", "tenants", "alpha")) in alpha["os_name"]
    assert w["pid"] in alpha["usage"]["pids"]

    assert await d.call("shutdown") == "shutting down"
    with trio.fail_after(20):
        await d.daemon.stopped.wait()
    assert not pid_alive(w["pid"])
    # Not even our root is left, in any hierarchy.
    assert not [r for r in cg.roots if r.exists()]


def test_forced_cgroup2_refuses_to_start_naming_the_memory_controller(
    cg: CgroupRoot, cfg: ConfigDir
) -> None:
    if Cgroup2Backend.probe(BackendOptions(cgroup_root=cg.name)) is None:
        pytest.skip("cgroup2 with a memory controller is usable here; nothing to refuse")
    cfg.tenant("alpha", f"[[worker]]\nname = 'w'\ncommand = {SLEEPER}\n")
    cfg.write(backend="auto", cgroup_root=cg.name)
    proc = subprocess.run(
        [DAEMON, "--config", str(cfg.path), "--backend", "cgroup2"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cgroup2" in proc.stderr and "memory controller" in proc.stderr, proc.stderr
    assert not cfg.socket.exists()
    assert not cg.leftovers()


# --------------------------------------------------------------------------- attach before exec


async def test_first_instruction_runs_inside_the_leaf(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    # `cat` is the worker itself (no shell of ours in the log): what it prints is where the
    # program was when it first ran.
    cfg.tenant(
        "probe",
        """
        restart = { policy = "never" }
        [[worker]]
        name = "cat"
        command = ["cat", "/proc/self/cgroup"]
        """,
    )
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    w = await d.wait_for("probe:cat-0", lambda w: w["state"] == "exited")
    assert w["exit_reason"] == "exit:0"
    own = fs.own_cgroups(cfg.worker_log("probe", "cat-0").read_text())
    for controller in ("memory", "cpu"):
        assert own[controller].endswith(f"/{cg.name}/tenants/probe/@cat-0"), (controller, own)
    for controller in ("pids", "cpuacct"):
        assert own[controller].endswith(f"/{cg.name}/tenants/probe"), (controller, own)


# --------------------------------------------------------------------------- memory


HOG_4X = worker_py(
    # 4x the tenant's 64 MiB max, touched page by page, then wait to be killed.
    "import time\n"
    "hoard = [bytearray(1 << 20) for _ in range(256)]\n"
    "print('survived', flush=True)\n"
    "time.sleep(60)\n"
)

BEAT = worker_py("import time\nwhile True:\n    print('beat', flush=True); time.sleep(0.2)\n")


@pytest.mark.slow
async def test_oom_killed_by_kernel_restarted_sibling_untouched(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    cfg.tenant(
        "hog",
        f"""
        memory = {{ max = "64MiB" }}
        restart = {{ policy = "always", backoff_initial = 0.05, max_restarts = 99 }}
        [[worker]]
        name = "grow"
        command = {HOG_4X}
        """,
    )
    cfg.tenant(
        "calm",
        f"""
        memory = {{ max = "64MiB" }}
        [[worker]]
        name = "beat"
        command = {BEAT}
        """,
    )
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    calm = await d.worker("calm:beat-0")
    t0 = time.monotonic()
    w = await d.wait_for(
        "hog:grow-0", lambda w: w["restarts"] >= 1 and w["exit_reason"] == "oom-killed", 30
    )
    assert w["state"] in ("running", "backoff", "starting")
    oom = await d.call("events", kind="oom-kill")
    assert any(e["partition"] == "tenants/hog" and e["leaf"] == "grow-0" for e in oom), oom
    # The kernel counted it in the hog's own leaf, and nowhere near the sibling.
    assert (
        fs.read_keyed(cg.dir("memory", "tenants", "hog", "@grow-0", "memory.oom_control"))[
            "oom_kill"
        ]
        >= 1
    )
    report = await d.call("partitions")
    assert find_partition(report, "tenants/hog")["usage"]["oom_kills"] >= 1
    assert find_partition(report, "tenants/calm")["usage"]["oom_kills"] == 0
    after = await d.worker("calm:beat-0")
    assert after["pid"] == calm["pid"] and after["restarts"] == 0
    # Same process, still counting: its uptime kept growing through the hog's OOMs.
    assert after["uptime"] >= calm["uptime"] + 0.8 * (time.monotonic() - t0) - 0.1
    assert "survived" not in cfg.worker_log("hog", "grow-0").read_text()


PRESSURE = worker_py(
    # 100 MiB: above max - reserved (96 MiB), below max (128 MiB).
    "import time\n"
    "hoard = [bytearray(1 << 20) for _ in range(100)]\n"
    "print('holding', flush=True)\n"
    "time.sleep(60)\n"
)


async def test_memory_pressure_event_when_usage_crosses_max_minus_reserved(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    cfg.tenant(
        "press",
        f"""
        memory = {{ max = "128MiB", reserved = "32MiB" }}
        restart = {{ policy = "never" }}
        [[worker]]
        name = "hold"
        command = {PRESSURE}
        """,
    )
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    mem = cg.dir("memory", "tenants", "press")
    assert read_int(mem / "memory.soft_limit_in_bytes") == 96 * MiB
    with trio.fail_after(20):
        while True:
            events = [
                e
                for e in await d.call("events", kind="memory-pressure")
                if e["partition"] == "tenants/press"
            ]
            if events:
                break
            await trio.sleep(0.05)
    assert events[0]["threshold"] == 96 * MiB and events[0]["usage"] >= 96 * MiB
    assert events[0]["max"] == 128 * MiB
    # Pressure is a warning, not a kill: the worker holds its memory and keeps running.
    w = await d.worker("press:hold-0")
    assert w["state"] == "running"
    usage = find_partition(await d.call("partitions"), "tenants/press")["usage"]
    assert usage["memory_pressure_events"] == 1
    assert 96 * MiB <= usage["memory_current"] <= 128 * MiB
    assert usage["oom_kills"] == 0


# --------------------------------------------------------------------------- pids


# Every process forks on each of 8 rounds, so without a limit this is 2**8 = 256 processes
# (a bomb that cannot take the machine down if the limit were missing); with pids = 16 the
# kernel refuses the rest with EAGAIN.
FORK_BOMB = worker_py(
    "import os, time\n"
    "refused = 0\n"
    "for _ in range(8):\n"
    "    try:\n"
    "        os.fork()\n"
    "    except OSError:\n"
    "        refused += 1\n"
    "if refused:\n"
    "    print('refused', refused, flush=True)\n"
    "time.sleep(120)\n"
)


async def test_fork_bomb_stops_at_pids_and_stop_cleans_up(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    cfg.tenant(
        "bomb",
        f"""
        pids = 16
        restart = {{ policy = "never" }}
        [[worker]]
        name = "fork"
        command = {FORK_BOMB}
        """,
    )
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    pids_dir = cg.dir("pids", "tenants", "bomb")
    assert read_int(pids_dir / "pids.max") == 16
    log = cfg.worker_log("bomb", "fork-0")
    seen: set[int] = set()
    with trio.fail_after(20):
        while "refused" not in (log.read_text() if log.exists() else ""):
            assert read_int(pids_dir / "pids.current") <= 16
            await trio.sleep(0.02)
    for _ in range(10):
        assert read_int(pids_dir / "pids.current") <= 16
        usage = find_partition(await d.call("partitions"), "tenants/bomb")["usage"]
        assert usage["pids_current"] is not None and usage["pids_current"] <= 16
        seen.update(usage["pids"])
        await trio.sleep(0.05)
    # The kernel refused forks at the limit and the bomb filled it. (v1 counts a refusal in
    # the forking task's own cgroup - here the partition, where the worker sits in pids.)
    refusals = fs.read_keyed(pids_dir / "pids.events").get("max", 0)
    assert refusals >= 1
    assert usage["pids_current"] == 16 and len(seen) >= 16
    assert (await d.worker("bomb:fork-0"))["state"] == "running"

    result = await d.call("stop", tenant="bomb")
    assert result[0]["state"] == "stopped"
    assert read_int(pids_dir / "pids.current") == 0
    assert not [p for p in seen if pid_alive(p)]
    assert not [leaf for leaf in leaf_dirs(cg, "tenants/bomb", "fork-0") if leaf.exists()]


# --------------------------------------------------------------------------- cpu


SPIN = worker_py("while True:\n    pass\n")


@pytest.mark.slow
async def test_cpu_max_caps_a_spinner_at_its_share_of_the_machine(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    cfg.tenant(
        "spin",
        f"""
        cpu = {{ max = 20 }}
        [[worker]]
        name = "loop"
        command = {SPIN}
        """,
    )
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    ncpu = os.cpu_count() or 1
    cpu_dir = cg.dir("cpu", "tenants", "spin")
    # cpu.max is a percent of the whole machine: 20 % of ncpu CPUs is 0.2 * ncpu cores'
    # worth of time per period (40 ms per 100 ms on 2 CPUs, i.e. 40 % of one core).
    assert read_int(cpu_dir / "cpu.cfs_quota_us") == quota_for(20, ncpu) == round(0.2 * ncpu * 1e5)
    assert read_int(cpu_dir / "cpu.cfs_period_us") == 100_000
    await d.wait_for("spin:loop-0", lambda w: w["state"] == "running")
    await trio.sleep(0.3)  # past the interpreter's start-up
    usage_file = cg.dir("cpuacct", "tenants", "spin", "cpuacct.usage")
    u0, t0 = read_int(usage_file), time.monotonic()
    await trio.sleep(2.0)
    u1, t1 = read_int(usage_file), time.monotonic()
    used, wall = (u1 - u0) / 1e9, t1 - t0
    allowed = 0.2 * ncpu * wall
    # Upper bound only (load can only lower what the spinner gets); one period of slack for
    # where the window's edges fall inside the quota periods.
    assert 0 < used <= allowed * 1.1 + 0.2 * ncpu * 0.1, (used, allowed)
    with trio.fail_after(10):
        while True:
            usage = find_partition(await d.call("partitions"), "tenants/spin")["usage"]
            if usage["cpu_throttled_ns"]:
                break
            await trio.sleep(0.1)
    assert usage["cpu_throttled_ns"] > 0
    assert usage["cpu_usage_ns"] >= u1


# --------------------------------------------------------------------------- admission


def test_child_max_above_parent_rejected_before_any_cgroup(cg: CgroupRoot, cfg: ConfigDir) -> None:
    cfg.partitions = """
[[partition]]
name = "tenants"
flags = ["hierarchical"]
memory = { max = "64MiB" }
"""
    greedy = cfg.tenant(
        "greedy",
        f"""
        memory = {{ max = "128MiB" }}
        [[worker]]
        name = "w"
        command = {SLEEPER}
        """,
    )
    # A tenant that fits, beside it: a daemon that started the valid tenants would
    # create the cgroup roots for it, so "no root exists" can fail.
    cfg.tenant(
        "modest",
        f"""
        memory = {{ max = "32MiB" }}
        [[worker]]
        name = "w"
        command = {SLEEPER}
        """,
    )
    cfg.write(backend="cgroup1", cgroup_root=cg.name)
    for extra in (["--check"], []):
        proc = subprocess.run(
            [DAEMON, "--config", str(cfg.path), *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env=cli_env(),
        )
        assert proc.returncode == 2, (extra, proc.stdout, proc.stderr)
        # One problem, on the line of the file to edit.
        located = [line for line in proc.stderr.splitlines() if line.startswith(f"{cfg.root}/")]
        assert located == [
            f"{greedy}: memory.max: max 128MiB of 'tenants/greedy' exceeds the max 64MiB "
            "in force at 'tenants'"
        ], proc.stderr
        assert "1 problem; nothing was started." in proc.stderr.splitlines(), proc.stderr
        assert not [r for r in cg.roots if r.exists()], extra
        assert not cfg.worker_log("modest", "w-0").exists()


# --------------------------------------------------------------------------- teardown


async def test_stopping_a_tenant_removes_its_worker_leaves(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    cfg.tenant(
        "pair",
        f"""
        memory = {{ max = "64MiB" }}
        [[worker]]
        name = "w"
        instances = 2
        command = {SLEEPER}
        """,
    )
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    leaves = leaf_dirs(cg, "tenants/pair", "w-0") + leaf_dirs(cg, "tenants/pair", "w-1")
    assert all(leaf.is_dir() for leaf in leaves)
    pids = [w["pid"] for w in await d.call("status", tenant="pair")]
    stopped = await d.call("stop", tenant="pair")
    assert {w["state"] for w in stopped} == {"stopped"}
    assert not [leaf for leaf in leaves if leaf.exists()]
    assert not [p for p in pids if pid_alive(p)]
    # The partition itself stays (its limits are config, not per run) ...
    assert cg.dir("memory", "tenants", "pair").is_dir()
    # ... and a start builds fresh leaves again.
    started = await d.call("start", tenant="pair", wait=True)
    assert {w["state"] for w in started} == {"running"}
    assert all(leaf.is_dir() for leaf in leaves)


def test_after_sigkill_of_the_daemon_the_next_start_reaps_leftovers(
    cg: CgroupRoot, cfg: ConfigDir
) -> None:
    for name in ("alpha", "bravo"):
        cfg.tenant(
            name,
            f"""
            memory = {{ max = "64MiB" }}
            pids = 8
            [[worker]]
            name = "w"
            command = {SLEEPER}
            """,
        )
    # "restart": the next start kills and rebuilds (the default, "adopt": test_adopt.py).
    cfg.write(backend="cgroup1", cgroup_root=cg.name, on_restart="restart")
    first = DaemonProc(cfg)
    second: DaemonProc | None = None
    try:
        old = {w["name"]: w["pid"] for w in _all_running(cfg)}
        alpha_mem = cg.dir("memory", "tenants", "alpha")
        old_ino = alpha_mem.stat().st_ino
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        first.log.close()
        # The dead daemon's workers and cgroups outlive it ...
        assert all(pid_alive(p) for p in old.values())
        assert all(p in fs.read_procs(alpha_mem / "@w-0") for p in [old["alpha:w-0"]])

        second = DaemonProc(cfg)
        # ... until the next start: old workers killed, partitions built afresh.
        wait_until(lambda: not any(pid_alive(p) for p in old.values()), 10, "old workers gone")
        new = {w["name"]: w for w in _all_running(cfg)}
        assert all(new[n]["pid"] != old[n] for n in old)
        assert alpha_mem.stat().st_ino != old_ino
        assert fs.read_procs(alpha_mem / "@w-0") == [new["alpha:w-0"]["pid"]]
        assert read_int(cg.dir("pids", "tenants", "alpha", "pids.current")) == 1
        out = second.output()
        assert "reaped leftovers of a previous run" in out
        assert "tenants/alpha" in out and "tenants/bravo" in out
        assert second.stop() == 0
        assert not [r for r in cg.roots if r.exists()]
    finally:
        for d in (first, second):
            if d is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(timeout=30)
            if d is not None and not d.log.closed:
                d.log.close()


def _all_running(cfg: ConfigDir) -> list[dict]:
    """``status`` once every worker runs: a daemon serves its socket before its autostart
    tenants are all up."""
    wait_until(lambda: {w["state"] for w in _status(cfg)} == {"running"}, 30, "all running")
    return _status(cfg)


def _status(cfg: ConfigDir) -> list[dict]:
    return ctl_status(cfg.socket)


async def test_a_running_worker_is_already_in_its_leaf(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    # "running" means inside its partition: no moment in which status shows a pid that
    # the kernel still counts outside the leaf (the exec shim joins before spawn returns).
    cfg.tenant("alpha", f'autostart = false\n[[worker]]\nname = "w"\ncommand = {SLEEPER}\n')
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    for _ in range(20):
        (w,) = await d.call("restart", tenant="alpha", wait=True)
        assert w["state"] == "running"
        for leaf in leaf_dirs(cg, "tenants/alpha", "w-0"):
            assert w["pid"] in fs.read_procs(leaf), leaf
