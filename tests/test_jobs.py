"""Transient jobs (``run``, ``job``, ``supervisorctl-qnx run``) through the real daemon:
real processes in real partitions (cgroup v1 here, where the kernel's OOM killer is the
judge), driven the way an operator does, through the CLI and the socket.

Tests that run the CLI start the daemon as a subprocess (``daemon`` fixture): an
in-process daemon is a child subreaper whose reaper collects every child of the test
process it did not start itself, the CLI's exit status included.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisord_qnx.control.client import AsyncClient, Client
from supervisord_qnx.control.rpc import RpcError
from supervisord_qnx.partition import cgroupfs as fs
from tests.cgroup_helpers import CgroupRoot
from tests.conftest import PY, REPO, ConfigDir, Running, pid_alive, wait_until
from tests.daemonproc import DaemonProc, ctl

pytestmark = pytest.mark.integration

MiB = 1 << 20
SLEEPER = '["sleep", "1000"]'

# Touches 2x the job's 32 MiB cap page by page, half the tenant's 128 MiB: "survived"
# would mean the job's own cap did not hold.
HOG = "hoard = [bytearray(1 << 20) for _ in range(64)]\nprint('survived', flush=True)\n"


def alpha(cfg: ConfigDir) -> None:
    """A tenant to run jobs under: 128 MiB, 50 % CPU, 64 tasks."""
    cfg.tenant(
        "alpha",
        f"""
        memory = {{ max = "128MiB" }}
        cpu = {{ max = 50 }}
        pids = 64
        [[worker]]
        name = "w"
        command = {SLEEPER}
        """,
    )


@pytest.fixture
def daemon(daemon_procs: Callable[..., DaemonProc]) -> Callable[..., DaemonProc]:
    return daemon_procs


def call(cfg: ConfigDir, method: str, **params: Any) -> Any:
    with Client(cfg.socket, timeout=60) as client:
        return client.call(method, **params)


def job_exit(cfg: ConfigDir, job: str, timeout: float = 30) -> dict[str, Any]:
    """The ``job-exit`` event of ``job``, once there is one."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = [e for e in call(cfg, "events", kind="job-exit", limit=1000) if e["job"] == job]
        return bool(found)

    wait_until(seen, timeout, f"the job-exit event of {job}")
    return found[0]


async def wait_event(d: Running, job: str, timeout: float = 30) -> dict[str, Any]:
    """The ``job-exit`` event of ``job`` from an in-process daemon, once there is one."""
    with trio.fail_after(timeout):
        while True:
            for e in await d.call("events", kind="job-exit", limit=1000):
                if e["job"] == job:
                    return dict(e)
            await trio.sleep(0.05)


def job_dirs(cg: CgroupRoot, path: str) -> list[Path]:
    return [cg.dir(c, *path.split("/")) for c in ("memory", "cpu", "pids")]


# --------------------------------------------------------------------------- cgroup v1


@pytest.mark.slow
def test_job_over_its_memory_max_is_oom_killed_and_its_partition_removed(
    cg: CgroupRoot, cfg: ConfigDir, daemon: Callable[[], DaemonProc]
) -> None:
    alpha(cfg)
    cfg.write(backend="cgroup1", cgroup_root=cg.name)
    daemon()
    res = ctl(
        cfg.socket, "run", "--partition", "tenants/alpha", "--memory-max", "32MiB",
        "--", PY, "-u", "-c", HOG,
    )  # fmt: skip
    # The documented code for oom-killed, and the kernel did it before the job finished.
    assert res.returncode == 122, res.stdout + res.stderr
    assert "survived" not in res.stdout
    assert "oom-killed" in res.stderr
    end = job_exit(cfg, "job:1")
    assert end["exit_reason"] == "oom-killed" and end["exit_code"] == 122
    assert end["partition"] == "tenants/alpha/job-1"
    # Nothing of the job is left: no directory in any hierarchy, no partition in the
    # report, no row in status; the tenant beside it is untouched.
    assert not [p for p in job_dirs(cg, "tenants/alpha/job-1") if p.exists()]
    assert "job-1" not in json.dumps(call(cfg, "partitions")["tree"])
    assert [(w["name"], w["state"]) for w in call(cfg, "status")] == [("alpha:w-0", "running")]


async def test_a_running_job_is_in_status_inside_its_own_limited_partition(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    alpha(cfg)
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    started = await d.call(
        "run",
        partition="tenants/alpha",
        command=["sleep", "1000"],
        memory="32MiB",
        cpu=20,
        pids=8,
    )
    assert started["state"] == "running" and started["partition"] == "tenants/alpha/job-1"
    row = await d.worker("job:1")
    assert row["tenant"] == "job" and row["kind"] == "command" and row["state"] == "running"
    assert row["pid"] == started["pid"] and row["partition"] == "tenants/alpha/job-1"
    assert [w["name"] for w in await d.call("status", tenant="job")] == ["job:1"]
    # The kernel holds the job to its own figures, inside the tenant's.
    mem, cpu, pids = job_dirs(cg, "tenants/alpha/job-1")
    assert int((mem / "memory.limit_in_bytes").read_text()) == 32 * MiB
    assert int((cpu / "cpu.cfs_quota_us").read_text()) == fs.quota_for(20, os.cpu_count() or 1)
    assert (pids / "pids.max").read_text().strip() == "8"
    wait_until(lambda: started["pid"] in fs.read_procs(mem / "@run"), 5, "the job in its leaf")
    # A job's partition goes with the job: nothing is run inside it.
    with pytest.raises(RpcError) as err:
        await d.call("run", partition="tenants/alpha/job-1", command=["true"])
    assert err.value.code == "bad_request" and "job's partition" in err.value.message
    # A process the daemon supervises is never attach's to move.
    with pytest.raises(RpcError) as err:
        await d.call("attach", partition="tenants/alpha", pid=started["pid"])
    assert err.value.code == "permission_denied"
    # Shutdown takes the job down and removes its partition (the cg fixture checks it).
    await d.call("shutdown")
    with trio.fail_after(30):
        await d.daemon.stopped.wait()
    assert not pid_alive(started["pid"])
    end = [e for e in d.daemon.events.history if e["kind"] == "job-exit"]
    assert end and end[0]["exit_reason"] == "stopped (signal:SIGKILL)"


def test_a_job_that_does_not_fit_its_parent_is_refused_naming_why(
    cg: CgroupRoot, cfg: ConfigDir, daemon: Callable[[], DaemonProc]
) -> None:
    alpha(cfg)
    cfg.write(backend="cgroup1", cgroup_root=cg.name)
    daemon()
    res = ctl(
        cfg.socket, "run", "-p", "tenants/alpha", "--memory-max", "1GiB", "--cpu-max", "80",
        "--pids-max", "100", "--", "true",
    )  # fmt: skip
    assert res.returncode == 125, res.stdout + res.stderr
    assert "config_invalid" in res.stderr
    assert "exceeds the max 128MiB in force at 'tenants/alpha'" in res.stderr
    assert "cpu.max 80% of 'tenants/alpha/job-1' exceeds the cpu.max 50%" in res.stderr
    assert "pids 100 of 'tenants/alpha/job-1' exceeds the pids 64" in res.stderr
    with pytest.raises(RpcError) as err:
        call(cfg, "run", partition="tenants/nowhere", command=["true"])
    assert err.value.code == "not_found"
    with pytest.raises(RpcError) as err:
        call(cfg, "run", partition="tenants/alpha", command=["true"], memory="lots")
    assert err.value.code == "config_invalid" and "not a size" in err.value.message
    # Nothing was created for them, and nothing runs.
    assert not [p for p in job_dirs(cg, "tenants/alpha/job-1") if p.exists()]
    assert [w["name"] for w in call(cfg, "status")] == ["alpha:w-0"]
    assert call(cfg, "events", kind="job-start") == []


# --------------------------------------------------------------------------- any backend


def test_the_cli_streams_the_output_and_exits_with_the_jobs_code(
    cfg: ConfigDir, daemon: Callable[[], DaemonProc]
) -> None:
    alpha(cfg)
    cfg.write()
    daemon()
    script = "echo first; sleep 0.7; echo second >&2; exit 3"
    res = ctl(cfg.socket, "run", "-p", "tenants/alpha", "--", "sh", "-c", script)
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.stdout == "first\nsecond\n"
    assert "job 1 ended: exit:3 (exit code 3)" in res.stderr
    assert job_exit(cfg, "job:1")["exit_reason"] == "exit:3"
    # A signal is 128 + its number, as a shell says.
    res = ctl(cfg.socket, "run", "-p", "tenants/alpha", "--", "sh", "-c", "kill -9 $$")
    assert res.returncode == 128 + 9, res.stderr
    # A program that cannot start: 127, and the reason says why.
    res = ctl(cfg.socket, "run", "-p", "tenants/alpha", "--", "no-such-program-x")
    assert res.returncode == 127, res.stderr
    assert "spawn-failed" in res.stderr
    # --no-wait prints the id at once; `job ID` follows it to its end, from the start.
    res = ctl(cfg.socket, "run", "-p", "tenants/alpha", "--no-wait", "--", "sh", "-c", script)
    assert res.returncode == 0 and res.stdout == "4\n", res.stdout + res.stderr
    res = ctl(cfg.socket, "job", "4")
    assert res.returncode == 3 and res.stdout == "first\nsecond\n", res.stdout + res.stderr
    # --json: the final result with the output, for scripts.
    res = ctl(cfg.socket, "--json", "run", "-p", "tenants/alpha", "--", "echo", "hi")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["exit_reason"] == "exit:0" and out["output"] == "hi\n"


def test_a_job_past_its_timeout_ends_with_deadline(
    cfg: ConfigDir, daemon: Callable[[], DaemonProc]
) -> None:
    alpha(cfg)
    cfg.write()
    daemon()
    # The shell ignores SIGTERM and its child keeps going: only the kill of the whole
    # partition after the grace period ends it.
    script = "trap '' TERM; sleep 1000 & wait; sleep 1000"
    res = ctl(cfg.socket, "run", "-p", "tenants/alpha", "--timeout", "1", "--", "sh", "-c", script)
    assert res.returncode == 124, res.stdout + res.stderr
    assert "deadline" in res.stderr
    assert job_exit(cfg, "job:1")["exit_reason"] == "deadline: timeout 1s"
    (start,) = call(cfg, "events", kind="job-start")
    assert not pid_alive(start["pid"])
    assert "job-1" not in json.dumps(call(cfg, "partitions")["tree"])


async def test_a_client_that_goes_away_does_not_orphan_its_job(
    cfg: ConfigDir, start_daemon
) -> None:
    alpha(cfg)
    d = await start_daemon()
    marker = cfg.root / "finished"
    script = f"sleep 1; echo done > {marker}; exit 5"
    async with AsyncClient(cfg.socket) as client:

        async def run_and_wait() -> None:
            await client.call(
                "run", partition="tenants/alpha", command=["sh", "-c", script], wait=True
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_and_wait)
            with trio.fail_after(30):
                while not [w for w in await d.call("status", tenant="job") if w["pid"]]:
                    await trio.sleep(0.02)
            # The client leaves while its `run` still waits for the end.
            nursery.cancel_scope.cancel()
    end = await wait_event(d, "job:1")
    assert end["exit_reason"] == "exit:5" and end["exit_code"] == 5
    assert marker.read_text() == "done\n"
    # Its result is still there for whoever asks, and so is its log.
    result = await d.call("job", id=1)
    assert result["done"] and result["exit_code"] == 5 and result["state"] == "exited"


def test_portable_accounting_kills_a_job_at_its_own_max(
    cfg: ConfigDir, daemon: Callable[[], DaemonProc]
) -> None:
    # No partition of this config has a memory max, so the daemon's accounting has had
    # nothing to watch until the job's partition appears with one.
    cfg.tenant("loose", f'[[worker]]\nname = "w"\ncommand = {SLEEPER}\n')
    cfg.write()
    daemon()
    # 48 MiB held: over the job's 32 MiB, under the 64 MiB RLIMIT_DATA (2 x max) the
    # portable backend also gives each process, so only the sampled accounting ends it.
    hold = "import time\nh = [bytearray(1 << 20) for _ in range(48)]\ntime.sleep(60)\n"
    res = ctl(
        cfg.socket, "run", "-p", "tenants/loose", "--memory-max", "32MiB", "--timeout", "20",
        "--", PY, "-c", hold,
    )  # fmt: skip
    assert res.returncode == 123, res.stdout + res.stderr
    assert "memory-limit" in res.stderr
    assert job_exit(cfg, "job:1")["exit_reason"] == "memory-limit"
    limit = call(cfg, "events", kind="memory-limit")
    assert [e["partition"] for e in limit] == ["tenants/loose/job-1"], limit


async def test_a_wasm_job_runs_under_the_runner_and_ends_as_wasm_workers_do(
    cfg: ConfigDir, start_daemon
) -> None:
    alpha(cfg)
    d = await start_daemon()
    wasm = REPO / "config" / "wasm"
    started = await d.call(
        "run", partition="tenants/alpha", wasm=str(wasm / "heartbeat.wat"), memory="96MiB",
        timeout=3,
    )  # fmt: skip
    assert started["kind"] == "wasm" and started["state"] == "running", started
    row = await d.worker("job:1")
    assert row["kind"] == "wasm" and row["partition"] == "tenants/alpha/job-1"
    # Follow it as the CLI does, until the deadline ends it.
    offset, output = 0, b""
    with trio.fail_after(60):
        while True:
            r = await d.call("job", id=1, offset=offset, wait=0.5)
            output += r["output"]
            offset = r["offset"]
            if r["done"] and not r["output"]:
                break
    assert r["exit_reason"] == "deadline: timeout 3s" and r["exit_code"] == 124, r
    assert b"beat 1\n" in output, output
    # A trap in the module is the runner's word for the end, as for wasm workers.
    trapped = await d.call(
        "run", partition="tenants/alpha", wasm=str(wasm / "oob.wat"), memory="96MiB",
        wait=True,
    )  # fmt: skip
    assert trapped["exit_reason"].startswith("trap"), trapped
    assert trapped["exit_code"] == 126
    assert not (cfg.root / "state" / "wasm" / "job.job-2.report").exists()
