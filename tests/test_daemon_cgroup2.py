"""The cgroup2 backend through the real daemon: the cgroup v1 scenarios of
``test_daemon_cgroup.py`` on a pure cgroup v2 kernel.

These need a writable cgroup2 memory controller, which the CI host (hybrid layout) does
not have: there they skip with the probe's reason, and ``make test-cgroup2`` runs them in
a VM booting Debian's kernel, where ``SUPERVISORD_QNX_REQUIRE_CGROUP2=1`` makes a skip a
failure. The VM emulates its CPU in software, so every wait here is generous.

Each test roots its partitions under a unique ``cgroup_root`` and the ``cg`` fixture fails
the test if anything of it is left afterwards (after reaping, so nothing leaks on).
Assertions are on what an operator sees (``status``, ``partitions``, ``events``) and on the
kernel's own files.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisord_qnx.control.client import Client, DaemonUnreachable
from supervisord_qnx.control.rpc import ErrorCode, RpcError
from supervisord_qnx.partition import cgroupfs as fs
from supervisord_qnx.partition.cgroup_v2 import Cgroup2Backend
from supervisord_qnx.partition.cgroupfs import quota_for
from tests.cgroup_helpers import require_cgroup2, tree_dirs
from tests.conftest import ConfigDir, cli_env, pid_alive, wait_until, worker_py
from tests.daemonproc import DAEMON
from tests.test_daemon_cgroup import BEAT, FORK_BOMB, HOG_4X, PRESSURE, SLEEPER, SPIN

pytestmark = pytest.mark.integration

MiB = 1 << 20


class Cgroup2Root:
    """One test's cgroup root: its name for the config and its directory."""

    def __init__(self) -> None:
        self.name = f"sqnx-d2test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Constructed only to learn the directory; it creates nothing until ``create``.
        probe = Cgroup2Backend(self.name)
        try:
            self.root = probe.root
        finally:
            probe.close()

    def dir(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def leftovers(self) -> list[Path]:
        return list(tree_dirs([self.root]))

    def reap(self) -> None:
        b = Cgroup2Backend(self.name)
        try:
            b.reap_leftovers()
        finally:
            b.close()


@pytest.fixture
def cg() -> Iterator[Cgroup2Root]:
    """Requested before ``start_daemon``, so it is torn down after the daemon stopped."""
    require_cgroup2()
    root = Cgroup2Root()
    yield root
    left = root.leftovers()
    if left:
        root.reap()
    assert not left, f"cgroup directories left behind: {left}"


def read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def find_partition(report: dict[str, Any], path: str) -> dict[str, Any]:
    stack = [report["tree"]]
    while stack:
        node = stack.pop()
        if node["path"] == path:
            return dict(node)
        stack.extend(node["children"])
    raise KeyError(path)


# --------------------------------------------------------------------------- backend choice


async def test_auto_picks_cgroup2_and_shutdown_leaves_nothing(
    cg: Cgroup2Root, cfg: ConfigDir, start_daemon
) -> None:
    cfg.partitions = """
[[partition]]
name = "tenants"
flags = ["hierarchical"]
memory = { min = "8MiB" }
"""
    cfg.tenant(
        "alpha",
        f"""
        memory = {{ min = "4MiB", max = "64MiB", reserved = "8MiB" }}
        [[worker]]
        name = "w"
        command = {SLEEPER}
        """,
    )
    d = await start_daemon(backend="auto", cgroup_root=cg.name)
    assert (await d.call("version"))["backend"] == "cgroup2"
    w = await d.worker("alpha:w-0")
    assert w["state"] == "running"
    leaf = cg.dir("tenants", "alpha", "@w-0")
    wait_until(lambda: w["pid"] in fs.read_procs(leaf), 30, f"pid in {leaf}")
    alpha = cg.dir("tenants", "alpha")
    assert read_int(alpha / "memory.max") == 64 * MiB
    assert read_int(alpha / "memory.high") == 56 * MiB
    assert read_int(alpha / "memory.min") == 4 * MiB
    assert fs.read_procs(alpha) == []  # processes only in leaves
    report = await d.call("partitions")
    assert report["backend"] == "cgroup2"
    node = find_partition(report, "tenants/alpha")
    assert str(alpha) in node["os_name"]
    assert w["pid"] in node["usage"]["pids"]

    assert await d.call("shutdown") == "shutting down"
    with trio.fail_after(60):
        await d.daemon.stopped.wait()
    assert not pid_alive(w["pid"])
    assert not cg.root.exists()


async def test_first_instruction_runs_inside_the_leaf(
    cg: Cgroup2Root, cfg: ConfigDir, start_daemon
) -> None:
    cfg.tenant(
        "probe",
        """
        restart = { policy = "never" }
        [[worker]]
        name = "cat"
        command = ["cat", "/proc/self/cgroup"]
        """,
    )
    d = await start_daemon(backend="cgroup2", cgroup_root=cg.name)
    w = await d.wait_for("probe:cat-0", lambda w: w["state"] == "exited", 60)
    assert w["exit_reason"] == "exit:0"
    # Its output reaches the file through its log writer, whose interpreter can take
    # longer to start under software emulation than the 1 s an exit waits for it.
    log = cfg.worker_log("probe", "cat-0")
    wait_until(lambda: log.exists() and log.read_text().strip() != "", 60, "the cgroup line")
    text = log.read_text()
    assert text.strip().endswith(f"/{cg.name}/tenants/probe/@cat-0"), text


async def test_a_cpuset_partition_keeps_its_workers_on_cpu1_and_fifo_runs(
    cg: Cgroup2Root, cfg: ConfigDir, start_daemon
) -> None:
    # docs/realtime.md: cpuset through the v2 cpuset controller; fifo needs no RT group
    # runtime here (cgroup v2 has none), only the cpu.max rail.
    if (os.cpu_count() or 1) < 2:
        pytest.skip("pinning to CPU 1 needs a second CPU")
    report = "import os, time; print(sorted(os.sched_getaffinity(0)), os.sched_getscheduler(0), flush=True); time.sleep(1000)"  # noqa: E501
    cfg.tenant(
        "pinned",
        f"""
        cpuset = "1"
        cpu = {{ max = 20 }}
        [[worker]]
        name = "w"
        command = {worker_py(report)}
        sched = {{ policy = "fifo", priority = 10 }}
        """,
    )
    d = await start_daemon(backend="cgroup2", cgroup_root=cg.name)
    w = await d.wait_for("pinned:w-0", lambda w: w["state"] == "running", 60)
    log = cfg.worker_log("pinned", "w-0")
    wait_until(lambda: log.exists() and log.read_text().strip() != "", 60, "the report")
    assert log.read_text().split("\n")[0] == f"[1] {os.SCHED_FIFO}"
    status = Path(f"/proc/{w['pid']}/status").read_text()
    assert "Cpus_allowed_list:\t1\n" in status, status
    assert cg.dir("tenants", "pinned", "cpuset.cpus").read_text().strip() == "1"
    # Read back once the program runs: `running` comes as soon as the pid is known, while
    # the exec wrappers may still be on their way to chrt (slow under emulation).
    w = await d.worker("pinned:w-0")
    assert w["sched"] == {"policy": "fifo", "priority": 10, "nice": 0, "cpus": "1"}
    assert (await d.call("partitions"))["enforcement"]["cpuset"] == "kernel"


# --------------------------------------------------------------------------- memory


@pytest.mark.slow
async def test_oom_killed_by_kernel_restarted_sibling_untouched(
    cg: Cgroup2Root, cfg: ConfigDir, start_daemon
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
    d = await start_daemon(backend="cgroup2", cgroup_root=cg.name)
    calm = await d.wait_for("calm:beat-0", lambda w: w["state"] == "running", 60)
    w = await d.wait_for(
        "hog:grow-0", lambda w: w["restarts"] >= 1 and w["exit_reason"] == "oom-killed", 120
    )
    assert w["state"] in ("running", "backoff", "starting")
    oom = await d.call("events", kind="oom-kill")
    assert any(e["partition"] == "tenants/hog" and e["leaf"] == "grow-0" for e in oom), oom
    assert not any(e["partition"] == "tenants/calm" for e in oom), oom
    report = await d.call("partitions")
    assert find_partition(report, "tenants/hog")["usage"]["oom_kills"] >= 1
    assert find_partition(report, "tenants/calm")["usage"]["oom_kills"] == 0
    after = await d.worker("calm:beat-0")
    assert after["pid"] == calm["pid"] and after["restarts"] == 0
    assert after["state"] == "running"
    assert "survived" not in cfg.worker_log("hog", "grow-0").read_text()


async def test_reload_resizes_in_place_and_a_max_below_usage_is_refused_not_oom_killed(
    cg: Cgroup2Root, cfg: ConfigDir, start_daemon
) -> None:
    hold = worker_py(
        "import time\n"
        "hoard = bytearray(40 << 20)\n"
        "for i in range(0, len(hoard), 4096): hoard[i] = 1\n"
        "print('holding', flush=True)\n"
        "time.sleep(1000)\n"
    )
    body = 'memory = {{ max = "{m}", reserved = "{r}" }}\n[[worker]]\nname = "w"\ncommand = {c}\n'
    cfg.tenant("hold", body.format(m="128MiB", r="16MiB", c=hold))
    d = await start_daemon(backend="cgroup2", cgroup_root=cg.name)
    w = await d.wait_for("hold:w-0", lambda w: w["state"] == "running", 60)
    log = cfg.worker_log("hold", "w-0")
    wait_until(lambda: log.exists() and "holding" in log.read_text(), 60, "40MiB held")
    part = cg.dir("tenants", "hold")

    cfg.tenant("hold", body.format(m="96MiB", r="32MiB", c=hold))
    reply = await d.call("reload")
    assert reply["resized"]["names"] == ["tenants/hold"] and reply["failed"] == []
    assert read_int(part / "memory.max") == 96 * MiB
    assert read_int(part / "memory.high") == 64 * MiB

    # cgroup2 would OOM-kill to get below the usage; the daemon refuses instead.
    with pytest.raises(RpcError) as exc:
        await d.call("set", partition="tenants/hold", memory={"max": "16MiB", "reserved": 0})
    assert exc.value.code is ErrorCode.BACKEND_ERROR, exc.value
    assert "could not reclaim" in exc.value.message
    assert read_int(part / "memory.max") == 96 * MiB
    after = await d.worker("hold:w-0")
    assert after["pid"] == w["pid"] and after["state"] == "running" and after["restarts"] == 0
    assert await d.call("events", kind="oom-kill") == []


async def test_memory_pressure_event_from_memory_high(
    cg: Cgroup2Root, cfg: ConfigDir, start_daemon
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
    d = await start_daemon(backend="cgroup2", cgroup_root=cg.name)
    mem = cg.dir("tenants", "press")
    assert read_int(mem / "memory.high") == 96 * MiB
    with trio.fail_after(60):
        while True:
            events = [
                e
                for e in await d.call("events", kind="memory-pressure")
                if e["partition"] == "tenants/press"
            ]
            if events:
                break
            await trio.sleep(0.1)
    assert events[0]["threshold"] == 96 * MiB and events[0]["max"] == 128 * MiB
    assert fs.read_keyed(mem / "memory.events")["high"] >= 1
    # Pressure is a warning, not a kill: the worker holds its memory and keeps running.
    w = await d.wait_for("press:hold-0", lambda w: w["state"] == "running", 30)
    assert w["restarts"] == 0
    usage = find_partition(await d.call("partitions"), "tenants/press")["usage"]
    assert usage["memory_pressure_events"] >= 1
    assert usage["memory_current"] <= 128 * MiB
    assert usage["oom_kills"] == 0


# --------------------------------------------------------------------------- pids


async def test_fork_bomb_stops_at_pids_and_stop_cleans_up(
    cg: Cgroup2Root, cfg: ConfigDir, start_daemon
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
    d = await start_daemon(backend="cgroup2", cgroup_root=cg.name)
    bomb = cg.dir("tenants", "bomb")
    assert read_int(bomb / "pids.max") == 16
    log = cfg.worker_log("bomb", "fork-0")
    seen: set[int] = set()
    with trio.fail_after(60):
        while "refused" not in (log.read_text() if log.exists() else ""):
            assert read_int(bomb / "pids.current") <= 16
            await trio.sleep(0.05)
    usage = find_partition(await d.call("partitions"), "tenants/bomb")["usage"]
    assert usage["pids_current"] == 16
    seen.update(usage["pids"])
    assert len(seen) == 16
    assert (await d.worker("bomb:fork-0"))["state"] == "running"

    result = await d.call("stop", tenant="bomb")
    assert result[0]["state"] == "stopped"
    assert read_int(bomb / "pids.current") == 0
    assert not [p for p in seen if pid_alive(p)]
    assert not (bomb / "@fork-0").exists()


# A worker whose descendants leave its process group and session: a plain stop signal to
# the worker's group misses them; the partition's cgroup.kill does not.
ESCAPE = worker_py(
    "import subprocess, time\n"
    "for _ in range(3):\n"
    "    subprocess.Popen(['setsid', 'sleep', '1000'])\n"
    "print('spread', flush=True)\n"
    "time.sleep(1000)\n"
)


async def test_stop_takes_setsid_escapees_with_the_worker(
    cg: Cgroup2Root, cfg: ConfigDir, start_daemon
) -> None:
    cfg.tenant(
        "esc",
        f"""
        restart = {{ policy = "never" }}
        [[worker]]
        name = "w"
        command = {ESCAPE}
        """,
    )
    d = await start_daemon(backend="cgroup2", cgroup_root=cg.name)
    leaf = cg.dir("tenants", "esc", "@w-0")
    log = cfg.worker_log("esc", "w-0")
    wait_until(lambda: log.exists() and "spread" in log.read_text(), 60, "the escapees")
    # The worker and its three escapees, all still in the worker's leaf.
    wait_until(lambda: len(fs.read_procs(leaf)) == 4, 30, "four processes in the leaf")
    members = fs.read_procs(leaf)
    stopped = await d.call("stop", tenant="esc")
    assert stopped[0]["state"] == "stopped"
    assert not [p for p in members if pid_alive(p)]
    assert not leaf.exists()


# --------------------------------------------------------------------------- cpu


@pytest.mark.slow
async def test_cpu_max_caps_a_spinner_at_its_share_of_the_machine(
    cg: Cgroup2Root, cfg: ConfigDir, start_daemon
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
    d = await start_daemon(backend="cgroup2", cgroup_root=cg.name)
    ncpu = os.cpu_count() or 1
    spin = cg.dir("tenants", "spin")
    # 20 % of the machine: 0.2 * ncpu CPUs' worth of quota per 100 ms period.
    assert (spin / "cpu.max").read_text().split() == [str(quota_for(20, ncpu)), "100000"]
    await d.wait_for("spin:loop-0", lambda w: w["state"] == "running", 60)
    await trio.sleep(1.0)  # past the interpreter's start-up

    def used_s() -> float:
        return fs.read_keyed(spin / "cpu.stat")["usage_usec"] / 1e6

    u0, t0 = used_s(), time.monotonic()
    await trio.sleep(3.0)
    u1, t1 = used_s(), time.monotonic()
    used, allowed = u1 - u0, 0.2 * ncpu * (t1 - t0)
    # Upper bound only (load can only lower what the spinner gets), plus one period.
    assert 0 < used <= allowed * 1.1 + 0.2 * ncpu * 0.1, (used, allowed)
    with trio.fail_after(30):
        while True:
            usage = find_partition(await d.call("partitions"), "tenants/spin")["usage"]
            if usage["cpu_throttled_ns"]:
                break
            await trio.sleep(0.1)
    assert fs.read_keyed(spin / "cpu.stat")["nr_throttled"] > 0


# --------------------------------------------------------------------------- teardown


class Daemon:
    """The daemon as a separate process (so that it can be SIGKILLed), output to a file."""

    def __init__(self, cfg: ConfigDir, tag: str) -> None:
        self.cfg = cfg
        self.out = cfg.root / f"daemon-{tag}.out"
        with open(self.out, "w") as log:
            self.proc = subprocess.Popen(
                [DAEMON, "--config", str(cfg.path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=cli_env(),
            )
        wait_until(self.up, 120, "the daemon to answer ping")

    def up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}: {self.output()}")
        try:
            with Client(self.cfg.socket, timeout=30) as c:
                c.call("ping")
        except DaemonUnreachable:
            return False
        return True

    def call(self, method: str, **params: Any) -> Any:
        with Client(self.cfg.socket, timeout=60) as c:
            return c.call(method, **params)

    def output(self) -> str:
        return self.out.read_text()

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)


@pytest.mark.slow
def test_after_sigkill_of_the_daemon_the_next_start_reaps_leftovers(
    cg: Cgroup2Root, cfg: ConfigDir
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
    # Kill and rebuild is what "restart" asks for; the default ("adopt") keeps them.
    cfg.write(backend="cgroup2", cgroup_root=cg.name, on_restart="restart")
    started: list[Daemon] = []
    try:
        first = Daemon(cfg, "first")
        started.append(first)
        wait_until(
            lambda: {w["state"] for w in first.call("status")} == {"running"}, 60, "workers up"
        )
        old = {w["name"]: w["pid"] for w in first.call("status")}
        alpha = cg.dir("tenants", "alpha")
        old_ino = alpha.stat().st_ino
        old_pid = old["alpha:w-0"]
        wait_until(lambda: fs.read_procs(alpha / "@w-0") == [old_pid], 30, "the worker's leaf")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=30)
        # The dead daemon's workers and cgroups outlive it ...
        assert all(pid_alive(p) for p in old.values())
        assert fs.read_procs(alpha / "@w-0") == [old_pid]

        second = Daemon(cfg, "second")
        started.append(second)
        # ... until the next start: old workers killed, partitions built afresh.
        wait_until(lambda: not any(pid_alive(p) for p in old.values()), 60, "old workers gone")
        wait_until(
            lambda: {w["state"] for w in second.call("status")} == {"running"}, 60, "new workers"
        )
        new = {w["name"]: w for w in second.call("status")}
        assert all(new[n]["pid"] != old[n] for n in old)
        assert alpha.stat().st_ino != old_ino
        # "running" as soon as the daemon has the pid; the exec shim joins the leaf just
        # after, before the program runs.
        pid = new["alpha:w-0"]["pid"]
        wait_until(lambda: fs.read_procs(alpha / "@w-0") == [pid], 30, "the new worker's leaf")
        assert read_int(alpha / "pids.current") == 1
        out = second.output()
        assert "reaped leftovers of a previous run" in out
        assert "tenants/alpha" in out and "tenants/bravo" in out
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=60) == 0
        assert not cg.root.exists()
    finally:
        for d in started:
            d.end()


# --------------------------------------------------------------------------- transient jobs


@pytest.mark.slow
async def test_a_job_over_its_own_max_is_oom_killed_and_its_partition_removed(
    cg: Cgroup2Root, cfg: ConfigDir, start_daemon
) -> None:
    cfg.tenant(
        "alpha",
        f"""
        memory = {{ max = "128MiB" }}
        [[worker]]
        name = "w"
        command = {SLEEPER}
        """,
    )
    d = await start_daemon(backend="cgroup2", cgroup_root=cg.name)
    # Twice the job's 32 MiB, half the tenant's 128 MiB: only the job's own max stops it.
    hog = "hoard = [bytearray(1 << 20) for _ in range(64)]\nprint('survived', flush=True)\n"
    started = await d.call(
        "run", partition="tenants/alpha", command=["python3", "-u", "-c", hog], memory="32MiB"
    )
    # The job's partition is a cgroup of its own below the tenant's, with its own max
    # (read while the job may still run: it is removed when the job ends).
    job = cg.dir("tenants", "alpha", "job-1")
    if started["state"] == "running":
        with contextlib.suppress(FileNotFoundError):
            assert read_int(job / "memory.max") == 32 * MiB
    with trio.fail_after(120):
        result = await d.call("job", id=started["job"], wait=60)
    assert result["done"] and result["exit_reason"] == "oom-killed", result
    assert result["exit_code"] == 122
    assert b"survived" not in result["output"]
    assert not job.exists()
    assert (await d.worker("alpha:w-0"))["state"] == "running"
