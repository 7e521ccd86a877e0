"""Changing a live system through the real daemon: ``reload`` (and SIGHUP) applies only the
difference, ``set`` changes one partition until the next reload.

The cgroup v1 tests run under a unique ``cgroup_root`` (the ``cg`` fixture fails a test
that leaves anything behind) and read the kernel's own files; the portable ones check
the same behaviour where no privilege is needed. Assertions are on what an operator
sees: the replies, ``status`` pids, ``partitions``, the kernel limit.
"""

from __future__ import annotations

import signal
import subprocess
import textwrap
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisord_qnx.control.rpc import ErrorCode, RpcError
from tests.cgroup_helpers import CgroupRoot
from tests.conftest import ConfigDir, Running, pid_alive, wait_until, worker_py
from tests.daemonproc import DaemonProc, ctl
from tests.test_daemon_qnx import Sim, qnx_sim  # noqa: F401 - a fixture used below
from tests.test_qnx_backend import aps_partitions

pytestmark = pytest.mark.integration

MiB = 1 << 20
SLEEPER = '["sleep", "1000"]'


def tenant(
    cfg: ConfigDir,
    name: str,
    *,
    max_: str = "64MiB",
    command: str = SLEEPER,
    instances: int = 1,
    pids: int = 40,
    extra: str = "",
) -> Path:
    return cfg.tenant(
        name,
        f"""
        memory = {{ max = "{max_}" }}
        pids = {pids}
        {extra}
        [[worker]]
        name = "w"
        command = {command}
        instances = {instances}
        """,
    )


async def pids(d: Running) -> dict[str, int]:
    """Every running worker's pid, by name (what an operator compares before and after)."""
    status = await d.call("status")
    return {w["name"]: w["pid"] for w in status if w["state"] == "running"}


async def all_running(d: Running, names: set[str]) -> dict[str, int]:
    with trio.fail_after(20):
        while True:
            now = await pids(d)
            if set(now) == names:
                return now
            await trio.sleep(0.02)


def _last_argument_is(pid: int, arg: bytes) -> bool:
    return Path(f"/proc/{pid}/cmdline").read_bytes().endswith(b"\0" + arg + b"\0")


def find(report: dict[str, Any], path: str) -> dict[str, Any]:
    stack = [report["tree"]]
    while stack:
        node = stack.pop()
        if node["path"] == path:
            return dict(node)
        stack.extend(node["children"])
    raise KeyError(path)


def read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


async def start(start_daemon, backend: str, request: pytest.FixtureRequest) -> Running:
    if backend == "cgroup1":
        cg: CgroupRoot = request.getfixturevalue("cg")
        return await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    return await start_daemon(backend=backend)


# --------------------------------------------------------------------------- resize in place


async def test_reload_resizes_a_partition_in_place_without_restarting_anything(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    tenant(cfg, "alpha", max_="64MiB", instances=2)
    tenant(cfg, "beta")
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    before = await all_running(d, {"alpha:w-0", "alpha:w-1", "beta:w-0"})
    limit = cg.dir("memory", "tenants", "alpha", "memory.limit_in_bytes")
    assert read_int(limit) == 64 * MiB

    tenant(cfg, "alpha", max_="32MiB", instances=2)
    reply = await d.call("reload")

    assert reply["resized"]["names"] == ["tenants/alpha"]
    assert reply["resized"]["changes"]["tenants/alpha"] == {"memory.max": [64 * MiB, 32 * MiB]}
    assert reply["restarted"]["count"] == 0 and reply["added"]["count"] == 0
    assert reply["unchanged"]["names"] == ["beta"]
    assert reply["failed"] == [] and reply["dry_run"] is False
    # The kernel's figure changed; not one process was restarted.
    assert read_int(limit) == 32 * MiB
    assert read_int(cg.dir("memory", "tenants", "alpha", "memory.memsw.limit_in_bytes")) == 32 * MiB
    assert await pids(d) == before
    assert all(pid_alive(p) for p in before.values())
    alpha = find(await d.call("partitions"), "tenants/alpha")
    assert alpha["limits"]["memory"]["max"] == 32 * MiB
    assert alpha["override"] is None
    [event] = await d.call("events", kind="reload")
    assert event["ok"] is True and event["resized"] == ["tenants/alpha"]


# --------------------------------------------------------------------------- workers


@pytest.mark.parametrize("backend", ["portable", "cgroup1"])
async def test_reload_restarts_only_the_workers_whose_definition_changed(
    backend: str, cfg: ConfigDir, start_daemon, request: pytest.FixtureRequest
) -> None:
    tenant(cfg, "alpha", instances=2)
    tenant(cfg, "beta")
    d = await start(start_daemon, backend, request)
    before = await all_running(d, {"alpha:w-0", "alpha:w-1", "beta:w-0"})

    tenant(cfg, "alpha", instances=2, command='["sleep", "1001"]')
    reply = await d.call("reload")

    assert reply["restarted"]["names"] == ["alpha:w"]
    assert reply["unchanged"]["names"] == ["beta"]
    after = await all_running(d, {"alpha:w-0", "alpha:w-1", "beta:w-0"})
    assert after["beta:w-0"] == before["beta:w-0"]
    for name in ("alpha:w-0", "alpha:w-1"):
        assert after[name] != before[name]
        assert not pid_alive(before[name])
        # Its last argument (the exec shim, if still there, ends with the worker's argv;
        # in the middle of an execve the command line reads empty, hence the wait).
        wait_until(partial(_last_argument_is, after[name], b"1001"), 10, "the new command")


async def test_reload_changing_instances_adds_and_removes_only_instances(
    cfg: ConfigDir, start_daemon
) -> None:
    tenant(cfg, "alpha", instances=1)
    d = await start_daemon()
    before = await all_running(d, {"alpha:w-0"})

    tenant(cfg, "alpha", instances=3)
    reply = await d.call("reload")
    assert reply["scaled"] == {"alpha:w": [1, 3]} and reply["restarted"]["count"] == 0
    grown = await all_running(d, {"alpha:w-0", "alpha:w-1", "alpha:w-2"})
    assert grown["alpha:w-0"] == before["alpha:w-0"]

    tenant(cfg, "alpha", instances=2)
    await d.call("reload")
    shrunk = await all_running(d, {"alpha:w-0", "alpha:w-1"})
    assert shrunk == {k: grown[k] for k in ("alpha:w-0", "alpha:w-1")}
    assert not pid_alive(grown["alpha:w-2"])
    assert [w["name"] for w in await d.call("status")] == ["alpha:w-0", "alpha:w-1"]


@pytest.mark.parametrize("backend", ["portable", "cgroup1"])
async def test_reload_adds_and_removes_tenants_and_only_those(
    backend: str, cfg: ConfigDir, start_daemon, request: pytest.FixtureRequest
) -> None:
    tenant(cfg, "alpha")
    beta = tenant(cfg, "beta")
    d = await start(start_daemon, backend, request)
    before = await all_running(d, {"alpha:w-0", "beta:w-0"})

    beta.unlink()
    tenant(cfg, "gamma")
    reply = await d.call("reload")

    assert reply["added"]["names"] == ["gamma"] and reply["removed"]["names"] == ["beta"]
    assert reply["partitions"] == {"created": ["tenants/gamma"], "removed": ["tenants/beta"]}
    assert reply["unchanged"]["names"] == ["alpha"]
    after = await all_running(d, {"alpha:w-0", "gamma:w-0"})
    assert after["alpha:w-0"] == before["alpha:w-0"]
    assert not pid_alive(before["beta:w-0"])
    report = await d.call("partitions")
    assert find(report, "tenants/gamma")["tenant"] == "gamma"
    with pytest.raises(KeyError):
        find(report, "tenants/beta")
    if backend == "cgroup1":
        cg: CgroupRoot = request.getfixturevalue("cg")
        assert cg.dir("memory", "tenants", "gamma").is_dir()
        assert not cg.dir("memory", "tenants", "beta").exists()
        assert after["gamma:w-0"] in [
            int(p)
            for p in cg.dir("memory", "tenants", "gamma", "@w-0", "cgroup.procs")
            .read_text()
            .split()
        ]


async def test_a_broken_reload_changes_nothing_and_lists_every_problem(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    cfg.partitions = textwrap.dedent(
        """
        [[partition]]
        name = "tenants"
        flags = ["hierarchical"]
        memory = { max = "256MiB" }
        """
    )
    alpha = tenant(cfg, "alpha")
    beta = tenant(cfg, "beta")
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    before = await all_running(d, {"alpha:w-0", "beta:w-0"})
    report_before = await d.call("partitions")

    tenant(cfg, "alpha", max_="32MiB", extra="colour = 'blue'")  # an unknown key
    tenant(cfg, "beta", max_="1GiB")  # above the parent's 256MiB: admission
    tenant(cfg, "gamma")  # valid, but nothing of a broken reload is applied
    with pytest.raises(RpcError) as exc:
        await d.call("reload")

    assert exc.value.code is ErrorCode.CONFIG_INVALID
    problems = exc.value.data["problems"]
    assert (
        f"{alpha}: colour: unknown key (check the spelling; see docs/configuration.md)" in problems
    )
    assert any(p.startswith(f"{beta}: memory.max: ") and "256MiB" in p for p in problems), problems
    assert len(problems) == 2, problems
    assert await pids(d) == before
    assert read_int(cg.dir("memory", "tenants", "alpha", "memory.limit_in_bytes")) == 64 * MiB
    assert not cg.dir("memory", "tenants", "gamma").exists()
    report = await d.call("partitions")
    for path in ("tenants/alpha", "tenants/beta"):
        assert find(report, path)["limits"] == find(report_before, path)["limits"]
    with pytest.raises(KeyError):
        find(report, "tenants/gamma")
    assert [w["tenant"] for w in await d.call("status")] == ["alpha", "beta"]
    [event] = await d.call("events", kind="reload")
    assert event["ok"] is False and len(event["problems"]) == 2


async def test_dry_run_shows_the_difference_and_changes_nothing(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    tenant(cfg, "alpha")
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    before = await all_running(d, {"alpha:w-0"})
    tenant(cfg, "alpha", max_="48MiB")
    tenant(cfg, "gamma")

    reply = await d.call("reload", dry_run=True)

    assert reply["dry_run"] is True
    assert reply["resized"]["names"] == ["tenants/alpha"] and reply["added"]["names"] == ["gamma"]
    assert read_int(cg.dir("memory", "tenants", "alpha", "memory.limit_in_bytes")) == 64 * MiB
    assert not cg.dir("memory", "tenants", "gamma").exists()
    assert await pids(d) == before
    assert await d.call("events", kind="reload") == []
    # The same reload for real applies exactly that.
    assert (await d.call("reload"))["resized"] == reply["resized"]
    assert read_int(cg.dir("memory", "tenants", "alpha", "memory.limit_in_bytes")) == 48 * MiB


# --------------------------------------------------------------------------- the kernel refuses


HOG = worker_py(
    "import time\n"
    "hoard = bytearray(40 * 1024 * 1024)\n"
    "for i in range(0, len(hoard), 4096): hoard[i] = 1\n"
    "print('holding', flush=True)\n"
    "time.sleep(1000)\n"
)


async def test_a_resize_below_what_the_partition_uses_is_refused_and_changes_nothing(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    tenant(cfg, "alpha", max_="128MiB", command=HOG)
    tenant(cfg, "beta")
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    before = await all_running(d, {"alpha:w-0", "beta:w-0"})
    log = cfg.worker_log("alpha", "w-0")
    wait_until(lambda: log.exists() and "holding" in log.read_text(), 20, "the hog to hold 40MiB")
    limit = cg.dir("memory", "tenants", "alpha", "memory.limit_in_bytes")

    # pids changes too, and is written before the memory limit the kernel refuses: it
    # must be put back, so that the partition is exactly as it was.
    tenant(cfg, "alpha", max_="16MiB", command=HOG, pids=30)
    tenant(cfg, "beta", max_="32MiB")
    reply = await d.call("reload")

    [failure] = reply["failed"]
    assert failure["partition"] == "tenants/alpha"
    assert "EBUSY" in failure["reason"] and "keeps its previous figures" in failure["reason"]
    assert read_int(limit) == 128 * MiB
    assert (
        read_int(cg.dir("memory", "tenants", "alpha", "memory.memsw.limit_in_bytes")) == 128 * MiB
    )
    assert cg.dir("pids", "tenants", "alpha", "pids.max").read_text().strip() == "40"
    # The other resize of the same reload went through.
    assert read_int(cg.dir("memory", "tenants", "beta", "memory.limit_in_bytes")) == 32 * MiB
    assert await pids(d) == before
    report = await d.call("partitions")
    assert find(report, "tenants/alpha")["limits"]["memory"]["max"] == 128 * MiB
    assert find(report, "tenants/beta")["limits"]["memory"]["max"] == 32 * MiB

    # `set` meets the same refusal, as an error naming the file.
    with pytest.raises(RpcError) as exc:
        await d.call("set", partition="tenants/alpha", memory={"max": "16MiB"})
    assert exc.value.code is ErrorCode.BACKEND_ERROR
    assert "memory.limit_in_bytes" in exc.value.message and "EBUSY" in exc.value.message
    assert read_int(limit) == 128 * MiB
    assert find(await d.call("partitions"), "tenants/alpha")["override"] is None


# --------------------------------------------------------------------------- set


async def test_set_beyond_the_admission_rules_is_refused(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    cfg.partitions = textwrap.dedent(
        """
        [[partition]]
        name = "tenants"
        flags = ["hierarchical"]
        memory = { min = "16MiB", max = "256MiB" }
        """
    )
    tenant(cfg, "alpha")
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    limit = cg.dir("memory", "tenants", "alpha", "memory.limit_in_bytes")

    with pytest.raises(RpcError) as exc:
        await d.call("set", partition="tenants/alpha", memory={"max": "512MiB"})
    assert exc.value.code is ErrorCode.CONFIG_INVALID
    [problem] = exc.value.data["problems"]
    assert problem.startswith("partition 'tenants/alpha': memory.max: "), problem
    assert "exceeds the max 256MiB" in problem, problem

    with pytest.raises(RpcError) as exc:
        await d.call("set", partition="tenants/alpha", memory={"min": "32MiB"})
    assert exc.value.code is ErrorCode.CONFIG_INVALID
    assert "guarantees only 16MiB" in exc.value.data["problems"][0]

    with pytest.raises(RpcError) as exc:
        await d.call("set", partition="tenants/nobody", pids=5)
    assert exc.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(RpcError) as exc:
        await d.call("set", partition="tenants/alpha", memory={"max": "lots"})
    assert exc.value.code is ErrorCode.BAD_REQUEST

    assert read_int(limit) == 64 * MiB
    assert find(await d.call("partitions"), "tenants/alpha")["override"] is None


async def test_set_changes_the_kernel_figure_until_the_next_reload(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    tenant(cfg, "alpha")
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    before = await all_running(d, {"alpha:w-0"})
    limit = cg.dir("memory", "tenants", "alpha", "memory.limit_in_bytes")
    pids_max = cg.dir("pids", "tenants", "alpha", "pids.max")

    reply = await d.call("set", partition="tenants/alpha", memory={"max": "48MiB"}, pids=20)

    assert reply["changes"] == {"memory.max": [64 * MiB, 48 * MiB], "pids": [40, 20]}
    assert "until the next reload" in reply["note"]
    assert read_int(limit) == 48 * MiB and pids_max.read_text().strip() == "20"
    assert await pids(d) == before
    alpha = find(await d.call("partitions"), "tenants/alpha")
    assert alpha["override"] == {"memory.max": 48 * MiB, "pids": 20}
    assert alpha["limits"]["memory"]["max"] == 48 * MiB

    # The files did not change: the reload puts the configured figures back.
    reply = await d.call("reload")
    assert reply["overrides_dropped"] == ["tenants/alpha"]
    assert reply["resized"]["changes"]["tenants/alpha"] == {
        "memory.max": [48 * MiB, 64 * MiB],
        "pids": [20, 40],
    }
    assert read_int(limit) == 64 * MiB and pids_max.read_text().strip() == "40"
    assert find(await d.call("partitions"), "tenants/alpha")["override"] is None
    assert await pids(d) == before


# --------------------------------------------------------------------------- SIGHUP and the CLI


def test_sighup_and_the_cli_reload_and_set(cfg: ConfigDir) -> None:
    tenant(cfg, "alpha")
    tenant(cfg, "beta")
    cfg.write(backend="portable")
    proc = DaemonProc(cfg)  # its own process: the test signals only what it started
    try:
        _sighup_and_cli(cfg, proc)
    finally:
        if proc.proc.poll() is None:
            proc.stop()


def _sighup_and_cli(cfg: ConfigDir, proc: DaemonProc) -> None:

    def status() -> dict[str, Any]:
        import json

        out = ctl(cfg.socket, "--json", "status").stdout
        return {w["name"]: w for w in json.loads(out)}

    wait_until(lambda: all(w["state"] == "running" for w in status().values()), 20, "running")
    before = {n: w["pid"] for n, w in status().items()}

    tenant(cfg, "beta", command='["sleep", "1001"]')
    dry = ctl(cfg.socket, "reload", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run: nothing was changed" in dry.stdout and "beta:w" in dry.stdout
    assert {n: w["pid"] for n, w in status().items()} == before

    proc.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: (
            status()["beta:w-0"]["pid"] not in (None, before["beta:w-0"])
            and status()["beta:w-0"]["state"] == "running"
        ),
        20,
        "SIGHUP to restart beta's worker",
    )
    assert status()["alpha:w-0"]["pid"] == before["alpha:w-0"]

    out = ctl(cfg.socket, "set", "tenants/alpha", "--memory-max", "32MiB")
    assert out.returncode == 0, out.stderr
    assert "tenants/alpha: memory.max 64MiB -> 32MiB" in out.stdout
    assert "until the next reload" in out.stdout
    assert "alpha (tenant) *" in ctl(cfg.socket, "partitions").stdout

    (cfg.root / "tenants.d" / "beta.toml").write_text("[[worker]]\nname = 'w'\n")
    bad = ctl(cfg.socket, "reload")
    assert bad.returncode == 1
    assert "config_invalid" in bad.stderr and "beta.toml: worker[0]" in bad.stderr
    assert proc.stop() == 0


# --------------------------------------------------------------------------- portable, qnx


async def test_portable_resizes_its_accounting_and_refuses_a_max_below_usage(
    cfg: ConfigDir, start_daemon
) -> None:
    tenant(cfg, "alpha", max_="128MiB", command=HOG)
    d = await start_daemon()
    before = await all_running(d, {"alpha:w-0"})
    log = cfg.worker_log("alpha", "w-0")
    wait_until(lambda: log.exists() and "holding" in log.read_text(), 20, "the hog to hold 40MiB")

    with pytest.raises(RpcError) as exc:
        await d.call("set", partition="tenants/alpha", memory={"max": "16MiB"})
    assert exc.value.code is ErrorCode.BACKEND_ERROR
    assert "below what it uses now" in exc.value.message
    alpha = find(await d.call("partitions"), "tenants/alpha")
    assert alpha["usage"]["memory_limit"] == 128 * MiB and alpha["override"] is None

    await d.call("set", partition="tenants/alpha", memory={"max": "100MiB"})
    # The accounting works from the new figure (it kills at it, and reports it).
    alpha = find(await d.call("partitions"), "tenants/alpha")
    assert alpha["usage"]["memory_limit"] == 100 * MiB
    assert alpha["override"] == {"memory.max": 100 * MiB}
    assert await pids(d) == before


async def test_qnx_reload_and_set_modify_the_live_aps_partition(
    qnx_sim: Sim,  # noqa: F811 - the fixture imported above
    cfg: ConfigDir,
    start_daemon,
) -> None:
    body = 'cpu = {{ budget = {b}, max = {m} }}\n[[worker]]\nname = "w"\ncommand = {c}\n'
    qnx_sim.tenant(cfg, "alpha", body.format(b=20, m=40, c=SLEEPER))
    qnx_sim.tenant(cfg, "beta", '[[worker]]\nname = "w"\ncommand = ["sleep", "1000"]\n')
    d = await start_daemon(backend="qnx")
    before = await all_running(d, {"alpha:w-0", "beta:w-0"})
    row = aps_partitions()[qnx_sim.aps("alpha")]
    assert (row["budget"], row["max"]) == ("20%", "40%")

    qnx_sim.tenant(cfg, "alpha", body.format(b=30, m=50, c=SLEEPER))
    reply = await d.call("reload")
    assert reply["resized"]["names"] == [f"{qnx_sim.group}/alpha"] and reply["failed"] == []
    row = aps_partitions()[qnx_sim.aps("alpha")]
    assert (row["budget"], row["max"]) == ("30%", "50%")
    assert await pids(d) == before

    await d.call("set", partition=f"{qnx_sim.group}/alpha", cpu={"budget": 10})
    assert aps_partitions()[qnx_sim.aps("alpha")]["budget"] == "10%"
    # beta has no budget: giving it one would move its processes to another APS partition.
    with pytest.raises(RpcError) as exc:
        await d.call("set", partition=f"{qnx_sim.group}/beta", cpu={"budget": 5})
    assert exc.value.code is ErrorCode.BACKEND_ERROR and "restart the tenant" in exc.value.message
    assert qnx_sim.aps("beta") not in aps_partitions()
    assert await pids(d) == before


async def test_reload_removing_a_partition_gives_attached_processes_back_alive(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    tenant(cfg, "alpha")
    beta = tenant(cfg, "beta")
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    await all_running(d, {"alpha:w-0", "beta:w-0"})
    # Processes of this test's own: one lent to beta, one handed over with `own`.
    lent = subprocess.Popen(["sleep", "300"])
    owned = subprocess.Popen(["sleep", "300"])
    try:
        before = Path(f"/proc/{lent.pid}/cgroup").read_text()
        await d.call("attach", partition="tenants/beta", pid=lent.pid)
        await d.call("attach", partition="tenants/beta", pid=owned.pid, own=True)
        assert Path(f"/proc/{lent.pid}/cgroup").read_text() != before

        beta.unlink()
        assert (await d.call("reload"))["removed"]["names"] == ["beta"]

        assert pid_alive(lent.pid)
        assert Path(f"/proc/{lent.pid}/cgroup").read_text() == before
        # (The in-process daemon's child reaper may collect it: look at /proc, not wait().)
        wait_until(lambda: not pid_alive(owned.pid), 10, "the owned process to be killed")
        assert not cg.dir("memory", "tenants", "beta").exists()
        with pytest.raises(RpcError) as exc:
            await d.call("detach", pid=lent.pid)
        assert exc.value.code is ErrorCode.INVALID_STATE  # forgotten: nothing to give back
    finally:
        for p in (lent, owned):
            p.kill()
            p.wait(timeout=30)


# --------------------------------------------------------------------------- transient jobs


async def test_a_reload_keeps_running_jobs_and_ends_those_whose_partition_goes(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    """A job's partition is in no file: a reload neither reports it removed nor removes
    it, ``set`` keeps it, and a reload that removes the job's tenant ends the job first
    (a cgroup with a job's inside cannot be removed)."""
    tenant(cfg, "alpha", max_="128MiB")
    gone = tenant(cfg, "beta", max_="128MiB")
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    await all_running(d, {"alpha:w-0", "beta:w-0"})
    kept = await d.call("run", partition="tenants/alpha", command=["sleep", "1000"], memory="32MiB")
    ended = await d.call("run", partition="tenants/beta", command=["sleep", "1000"])
    kept_dir = cg.dir("memory", "tenants", "alpha", "job-1")

    tenant(cfg, "alpha", max_="96MiB")
    reply = await d.call("reload")
    assert reply["resized"]["names"] == ["tenants/alpha"] and reply["removed"]["count"] == 0
    assert reply["failed"] == [] and reply["partitions"]["removed"] == []
    assert find(await d.call("partitions"), "tenants/alpha/job-1")["limits"]["memory"]["max"] == (
        32 * MiB
    )
    assert read_int(kept_dir / "memory.limit_in_bytes") == 32 * MiB
    # A set after it still sees the job (the job follows the daemon's new tree).
    await d.call("set", partition="tenants/alpha", memory={"max": "90MiB"})
    assert "tenants/alpha/job-1" in json_paths(await d.call("partitions"))

    gone.unlink()
    reply = await d.call("reload")
    assert reply["removed"]["names"] == ["beta"] and reply["failed"] == []
    assert not cg.dir("memory", "tenants", "beta").exists()
    assert not pid_alive(ended["pid"])
    ends = {e["job"]: e for e in await d.call("events", kind="job-exit")}
    assert set(ends) == {"job:2"}
    # Ended by the daemon before its partition went, not killed from under it.
    assert ends["job:2"]["exit_reason"] == "stopped (signal:SIGKILL)"
    # The job in the tenant that stays runs on, in its partition.
    assert [w["name"] for w in await d.call("status", tenant="job")] == ["job:1"]
    assert pid_alive(kept["pid"]) and kept["pid"] in _procs(kept_dir / "@run")


def json_paths(report: dict[str, Any]) -> set[str]:
    out, stack = set(), [report["tree"]]
    while stack:
        node = stack.pop()
        out.add(node["path"])
        stack.extend(node["children"])
    return out


def _procs(leaf: Path) -> list[int]:
    return [int(x) for x in (leaf / "cgroup.procs").read_text().split()]


# --------------------------------------------------------------------------- ordering


async def test_a_reload_starts_added_tenants_in_after_order_and_stops_removed_in_reverse(
    cfg: ConfigDir, start_daemon
) -> None:
    tenant(cfg, "base")
    d = await start_daemon()
    await all_running(d, {"base:w-0"})
    # `top` is after `mid`, which is after `low`: files named so that any order but the
    # graph's would be visible.
    tenant(cfg, "top", extra='after = ["mid"]')
    tenant(cfg, "mid", extra='after = ["low"]')
    low = tenant(cfg, "low")
    reply = await d.call("reload")
    assert sorted(reply["added"]["names"]) == ["low", "mid", "top"]
    await all_running(d, {"base:w-0", "low:w-0", "mid:w-0", "top:w-0"})

    def seq(worker: str, new: str, events: list[dict[str, Any]]) -> int:
        return next(e["seq"] for e in events if e.get("worker") == worker and e["new"] == new)

    started = await d.call("events", kind="state")
    assert seq("low:w-0", "running", started) < seq("mid:w-0", "starting", started)
    assert seq("mid:w-0", "running", started) < seq("top:w-0", "starting", started)

    for path in (low, low.with_name("mid.toml"), low.with_name("top.toml")):
        path.unlink()
    reply = await d.call("reload")
    assert sorted(reply["removed"]["names"]) == ["low", "mid", "top"]
    stopped = await d.call("events", kind="state")
    assert seq("top:w-0", "stopped", stopped) < seq("mid:w-0", "stopping", stopped)
    assert seq("mid:w-0", "stopped", stopped) < seq("low:w-0", "stopping", stopped)
    assert set(await pids(d)) == {"base:w-0"}


# --------------------------------------------------------------------------- readiness


async def test_a_worker_a_reload_adds_or_replaces_gets_its_notify_socket(
    cfg: ConfigDir, start_daemon
) -> None:
    """Instances a reload makes run like those made at start-up: a ``ready = "notify"``
    worker is ``running`` once it said READY=1, through its own NOTIFY_SOCKET; a retired
    one's socket goes with it."""
    tenant(cfg, "base")
    d = await start_daemon()
    await all_running(d, {"base:w-0"})
    ready = worker_py(
        "import os, socket, time\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.sendmsg([b'READY=1\\nSTATUS=serving'], [], 0, os.environ['NOTIFY_SOCKET'])\n"
        "time.sleep(1000)\n"
    )
    tenant(cfg, "svc", command=ready, extra="", instances=1)
    body = (cfg.root / "tenants.d" / "svc.toml").read_text()
    (cfg.root / "tenants.d" / "svc.toml").write_text(
        body + 'ready = "notify"\nstart_timeout = 20\n'
    )
    await d.call("reload")
    await all_running(d, {"base:w-0", "svc:w-0"})
    first = await d.worker("svc:w-0")
    assert first["status_text"] == "serving"
    socket_path = Path(first["notify_socket"])
    assert socket_path.exists()

    # A changed definition replaces the worker: a new process, a new socket, ready again.
    (cfg.root / "tenants.d" / "svc.toml").write_text(
        body + 'ready = "notify"\nstart_timeout = 21\n'
    )
    reply = await d.call("reload")
    assert reply["restarted"]["names"] == ["svc:w"]
    await all_running(d, {"base:w-0", "svc:w-0"})
    second = await d.worker("svc:w-0")
    assert second["pid"] != first["pid"] and second["status_text"] == "serving"
    assert not socket_path.exists() or Path(second["notify_socket"]) == socket_path
