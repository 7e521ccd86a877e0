"""The whole daemon with ``backend = "qnx"`` on qnx-sim: APS partitions through the real
``aps``/``on`` simulators, real cgroup v1 cpu, real workers, the real control socket.

The backend's own tests (test_qnx_backend.py) drive ``QnxBackend`` directly; these go
through config files, admission, start-up, the supervisor and shutdown, in-process and
as ``supervisord-qnx`` subprocesses, as an operator on QNX would run it.

Each test gets its own qnx-sim state directory and cgroup root and ends with the
simulator's reboot (``qnx-sim-reset --kill``), after the daemon has stopped. Its group
partition has a unique name too, not the usual ``tenants``: the user-space accounting
finds a partition's processes by their ``SUPERVISORD_QNX_LEAF`` tag, which names the
partition path but not the daemon. It now looks only among the daemon's descendants,
but in-process daemons share the pytest process, so unique paths keep every test's
memory figures and shutdown kills its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisord_qnx.config.load import ConfigError, load
from supervisord_qnx.control.client import Client
from supervisord_qnx.daemon import admit, make_backend
from supervisord_qnx.supervise import state as runtime_state
from tests.conftest import PY, ConfigDir, cli_env, pid_alive, wait_until, worker_py
from tests.daemonproc import DAEMON, DaemonProc
from tests.test_adopt import recorded
from tests.test_daemon_socket import epoll_fds
from tests.test_qnx_backend import aps_partitions, cpu_ticks
from tests.test_qnx_sim import CPU, SIM_BIN, cgroup_cpu_or_skip

pytestmark = pytest.mark.integration

MiB = 1 << 20


def group_partition(name: str, share: int = 90) -> str:
    """The group every tenant here belongs to: its budget is carved from System, the
    tenants' from it."""
    return textwrap.dedent(
        f"""
        [[partition]]
        name = "{name}"
        flags = ["hierarchical"]
        cpu = {{ budget = {share} }}
        """
    )


BEAT = worker_py("import time\nwhile True: print('beat', flush=True); time.sleep(0.2)")
# Beats until FLAG exists: ends by itself, so no test signals a process it did not start.
FLAGGED = worker_py(
    "import os, time\nwhile not os.path.exists(os.environ['FLAG']): time.sleep(0.05)"
)


@dataclass
class Sim:
    cgroup: Path  # the cgroup root of the simulated APS partitions
    group: str  # the group partition's name (= its APS name)

    def tenant(self, cfg: ConfigDir, name: str, body: str) -> None:
        cfg.tenant(name, f'parent = "{self.group}"\n' + textwrap.dedent(body))

    def aps(self, tenant: str) -> str:
        return f"{self.group}.{tenant}"


@pytest.fixture
def qnx_sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cfg: ConfigDir) -> Iterator[Sim]:
    """qnx-sim first on PATH, a private simulator state and cgroup root, and a uniquely
    named group partition with a budget.

    The daemon (in-process or subprocess) inherits these variables; the qnx backend
    passes ``QNX_SIM_*`` on to ``on`` so workers find the same simulated partitions.
    """
    cgroup = f"qnx-daemon-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("PATH", f"{SIM_BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("QNX_SIM_STATE", str(tmp_path / "qnx-state"))
    monkeypatch.setenv("QNX_SIM_CGROUP", cgroup)
    sim = Sim(CPU / cgroup, f"q{uuid.uuid4().hex[:7]}")
    cfg.partitions = group_partition(sim.group)
    yield sim
    # The reboot: kills whatever a failed test left in a partition, removes the cgroups.
    subprocess.run([PY, str(SIM_BIN / "qnx-sim-reset"), "--kill"], check=False, timeout=30)


def toml_list(argv: list[str]) -> str:
    return json.dumps(argv)


def budget(rows: dict[str, dict[str, str]], name: str) -> str:
    return rows[name]["budget"]


# -- CPU budgets ---------------------------------------------------------------------

# Pinned from inside, not by `taskset`: workers run as an unprivileged user, who may not
# be able to reach this interpreter by path (a Python under root's 0700 home), and
# taskset's own exec of it would be that user's lookup.
SPIN = [PY, "-c", "import os\nos.sched_setaffinity(0, {0})\nwhile True: pass"]


async def test_cpu_shares_follow_budgets_20_and_60_through_the_daemon(
    qnx_sim: Sim, cfg: ConfigDir, start_daemon
) -> None:
    cgroup_cpu_or_skip()
    for name, share in (("low", 20), ("high", 60)):
        qnx_sim.tenant(
            cfg,
            name,
            f"""
            cpu = {{ budget = {share} }}
            [[worker]]
            name = "spin"
            command = {toml_list(SPIN)}
            """,
        )
    d = await start_daemon(backend="qnx")
    assert (await d.call("version"))["backend"] == "qnx"
    pids = {}
    for name in ("low", "high"):
        w = await d.wait_for(f"{name}:spin-0", lambda w: w["state"] == "running")
        pids[name] = w["pid"]
    # The daemon made the APS partitions: the group from System, the tenants from it.
    rows, group = aps_partitions(), qnx_sim.group
    assert budget(rows, "System") == "10%" and budget(rows, group) == "10%"
    assert budget(rows, qnx_sim.aps("low")) == "20%" and budget(rows, qnx_sim.aps("high")) == "60%"
    assert rows[qnx_sim.aps("low")]["parent"] == rows[group]["id"]
    await trio.sleep(0.5)  # both spinning and pinned before measuring
    for name, pid in pids.items():
        # `on` and the wrappers exec, so the pid the daemon reports is the spinner itself.
        cgroup = f":/{qnx_sim.cgroup.name}/{qnx_sim.aps(name)}\n"
        assert cgroup in Path(f"/proc/{pid}/cgroup").read_text()
        with trio.fail_after(20):  # the spinner pins itself once its interpreter is up
            while os.sched_getaffinity(pid) != {0}:
                await trio.sleep(0.05)
    before = {n: cpu_ticks(p) for n, p in pids.items()}
    await trio.sleep(3.0)
    used = {n: cpu_ticks(p) - before[n] for n, p in pids.items()}
    print(f"CPU ticks over 3 s on CPU 0 through the daemon: {used} (budgets 20:60)")
    assert used["low"] > 0, "a budget is a guaranteed minimum: the 20% tenant must not starve"
    # cpu.shares 2000:6000 is 1:3; other engineers' load on CPU 0 blurs it, hence the band.
    ratio = used["high"] / used["low"]
    assert 2.0 <= ratio <= 4.5, f"high/low = {ratio:.2f}, outside 2..4.5"
    report = await d.call("partitions")
    tenants = {c["path"]: c for c in report["tree"]["children"][0]["children"]}
    os_name = tenants[f"{group}/high"]["os_name"]
    assert os_name.startswith(f"APS partition {qnx_sim.aps('high')} (budget 60%"), os_name


# -- memory ----------------------------------------------------------------------------


async def test_memory_hog_killed_at_max_sibling_keeps_running(
    qnx_sim: Sim, cfg: ConfigDir, start_daemon
) -> None:
    # 4 MiB every 50 ms: past max (96 MiB) well before RLIMIT_DATA (2 x max) would make
    # the allocation fail, so the sampler, not the rlimit, ends it.
    hog = worker_py(
        "import time\n"
        "chunks = []\n"
        "while True:\n"
        "    chunks.append(bytearray(4 << 20)); time.sleep(0.05)\n"
    )
    qnx_sim.tenant(
        cfg,
        "hog",
        f"""
        memory = {{ max = "96MiB", reserved = "16MiB" }}
        cpu = {{ budget = 10 }}
        restart = {{ policy = "never" }}
        [[worker]]
        name = "grow"
        command = {hog}
        """,
    )
    qnx_sim.tenant(
        cfg,
        "calm",
        f"""
        memory = {{ max = "96MiB" }}
        cpu = {{ budget = 10 }}
        [[worker]]
        name = "beat"
        command = {BEAT}
        """,
    )
    d = await start_daemon(backend="qnx")
    calm = await d.wait_for("calm:beat-0", lambda w: w["state"] == "running")
    w = await d.wait_for("hog:grow-0", lambda w: w["state"] == "exited", timeout=30)
    assert w["exit_reason"] == "memory-limit"
    kinds = [e["kind"] for e in await d.call("events", limit=1000)]
    assert "memory-pressure" in kinds and "memory-limit" in kinds
    after = await d.worker("calm:beat-0")
    assert after["state"] == "running" and after["pid"] == calm["pid"]
    assert pid_alive(calm["pid"])


async def test_worker_limits_show_rlimit_data_twice_the_max(
    qnx_sim: Sim, cfg: ConfigDir, start_daemon
) -> None:
    show = worker_py(
        "import time\nprint(open('/proc/self/limits').read(), flush=True)\ntime.sleep(600)\n"
    )
    qnx_sim.tenant(
        cfg,
        "lim",
        f"""
        flags = ["memory-isolation"]
        memory = {{ max = "96MiB" }}
        cpu = {{ budget = 10 }}
        [[worker]]
        name = "show"
        command = {show}
        """,
    )
    d = await start_daemon(backend="qnx")
    await d.wait_for("lim:show-0", lambda w: w["state"] == "running")
    with trio.fail_after(15):
        while "Max data size" not in (
            text := "\n".join((await d.call("logs", tenant="lim"))[0]["lines"])
        ):
            await trio.sleep(0.05)
    limits = {
        m.group(1).strip(): (m.group(2), m.group(3))
        for m in re.finditer(r"^(Max [a-z ]+?)\s{2,}(\S+)\s+(\S+)", text, re.MULTILINE)
    }
    cap = str(2 * 96 * MiB)  # RLIMIT_SLACK x memory.max, soft and hard, set by `on -L`
    assert limits["Max data size"] == (cap, cap), text
    assert limits["Max core file size"] == ("0", "0"), "memory-isolation: no core dumps"


# -- lifecycle of the APS partitions ----------------------------------------------------


def two_beat_tenants(qnx_sim: Sim, cfg: ConfigDir) -> None:
    for name, share in (("alpha", 20), ("bravo", 60)):
        qnx_sim.tenant(
            cfg,
            name,
            f"""
            cpu = {{ budget = {share} }}
            memory = {{ max = "128MiB" }}
            [[worker]]
            name = "beat"
            command = {BEAT}
            """,
        )


async def running_pids(d: Any) -> dict[str, int]:
    out = {}
    for name in ("alpha:beat-0", "bravo:beat-0"):
        out[name] = (await d.wait_for(name, lambda w: w["state"] == "running"))["pid"]
    return out


def plain_show_budget(name: str) -> str:
    """The budget column of ``aps show`` (no options, the usage view) for one partition."""
    out = subprocess.run(
        ["aps", "show"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    for line in out.splitlines():
        if line.split() and line.split()[0] == name:
            return line.split("|")[1].strip()
    raise AssertionError(f"{name} not in `aps show`:\n{out}")


async def test_shutdown_gives_budgets_back_and_a_restart_reuses_the_partitions(
    qnx_sim: Sim, cfg: ConfigDir, start_daemon
) -> None:
    two_beat_tenants(qnx_sim, cfg)
    first = await start_daemon(backend="qnx")
    old = await running_pids(first)
    assert budget(aps_partitions(), "System") == "10%"
    first.daemon.request_shutdown()
    with trio.fail_after(30):
        await first.daemon.stopped.wait()
    # APS partitions outlive the daemon (no delete before reboot) but hold no budget.
    ours = [qnx_sim.group, qnx_sim.aps("alpha"), qnx_sim.aps("bravo")]
    rows = aps_partitions()
    assert set(ours) <= set(rows)
    assert budget(rows, "System") == "100%" and plain_show_budget("System") == "100%"
    assert {budget(rows, n) for n in ours} == {"0%"}
    for pid in old.values():
        assert not pid_alive(pid)
    # The next start finds them by name and reconfigures them instead of failing.
    second = await start_daemon(backend="qnx")
    new = await running_pids(second)
    assert set(new.values()).isdisjoint(old.values())
    rows = aps_partitions()
    assert [budget(rows, n) for n in ["System", *ours]] == ["10%", "10%", "20%", "60%"]
    assert len(rows) == 4, "no duplicate partitions"


def test_restart_after_sigkill_over_leftover_partitions(
    qnx_sim: Sim, cfg: ConfigDir, tmp_path: Path
) -> None:
    """A daemon killed outright leaves its partitions with their budgets, its workers
    running in them and a stale socket; the next daemon must start over all of that."""
    two_beat_tenants(qnx_sim, cfg)
    # "restart": the next daemon stops what the dead one left and starts afresh (the
    # default, "adopt", is tested in test_adopt.py and below).
    cfg.write(backend="qnx", on_restart="restart")
    first = DaemonProc(cfg)
    try:
        orphans = _status_pids(cfg)
        recorded(cfg, {n: {"state": "running", "pid": p} for n, p in orphans.items()})
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
    finally:
        first.log.close()
    assert cfg.socket.exists(), "SIGKILL leaves the socket behind"
    assert all(pid_alive(p) for p in orphans.values()), "and the workers running"
    assert budget(aps_partitions(), "System") == "10%"

    second = DaemonProc(cfg)
    try:
        fresh = _status_pids(cfg)
        assert set(fresh.values()).isdisjoint(orphans.values())
        rows = aps_partitions()
        assert budget(rows, "System") == "10%" and budget(rows, qnx_sim.aps("bravo")) == "60%"
        assert "error" not in second.output().lower()
        assert second.stop() == 0
    finally:
        if second.proc.poll() is None:
            second.proc.kill()
            second.proc.wait(timeout=30)
    assert budget(aps_partitions(), "System") == "100%"
    # The first daemon's orphans were stopped by the second: the runtime state named them
    # (pid and start time), so no unsupervised worker is left behind.
    assert not any(pid_alive(p) for p in orphans.values())


def _state(cfg: ConfigDir) -> dict[str, Any]:
    return runtime_state.decode((cfg.root / "state" / runtime_state.STATE_FILE).read_bytes())


def test_a_restart_after_sigkill_adopts_the_workers_on_qnx(
    qnx_sim: Sim, cfg: ConfigDir, tmp_path: Path
) -> None:
    """The default, ``on_restart = "adopt"``: the same workers run on under the next
    daemon (identified by the runtime state, since QNX has no cgroup to read)."""
    two_beat_tenants(qnx_sim, cfg)
    cfg.write(backend="qnx")
    first = DaemonProc(cfg)
    try:
        before = _status_pids(cfg)
        recorded(cfg, {n: {"state": "running", "pid": p} for n, p in before.items()})
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
    finally:
        first.log.close()
    # The start times and the boot were read the QNX way (the simulator's `pidin`
    # times), not from Linux's /proc/PID/stat, whose ticks are a number.
    body = _state(cfg)
    assert body["boot_id"].startswith("qnx-procnto-start:")
    rec = body["tenants"]["alpha"]["instances"]["beat-0"]
    assert isinstance(rec["ticks"], str) and re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d", rec["ticks"]
    )
    second = DaemonProc(cfg)
    try:
        assert _status_pids(cfg) == before
        assert "adopted a running worker" in second.output()
        assert second.stop() == 0
    finally:
        if second.proc.poll() is None:
            second.proc.kill()
            second.proc.wait(timeout=30)
    # Its clean stop stopped the adopted workers too.
    assert not any(pid_alive(p) for p in before.values())


def test_a_worker_whose_start_time_does_not_match_is_lost_and_never_touched_on_qnx(
    qnx_sim: Sim, cfg: ConfigDir, tmp_path: Path
) -> None:
    """A recorded pid whose start time (read with `pidin`) is not the recorded one is
    another process as far as the daemon can tell: never signalled, the worker reported
    lost and restarted. The process ends by itself (its flag) at the end."""
    flag = tmp_path / "flag-end"
    qnx_sim.tenant(
        cfg,
        "lone",
        f"""
        [[worker]]
        name = "w"
        command = {FLAGGED}
        env = {{ FLAG = "{flag}" }}
        """,
    )
    cfg.write(backend="qnx")
    first = DaemonProc(cfg)
    try:
        old = _status_pids(cfg)["lone:w-0"]
        recorded(cfg, {"lone:w-0": {"state": "running", "pid": old}})
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
    finally:
        first.log.close()
    try:
        path = cfg.root / "state" / runtime_state.STATE_FILE
        body = _state(cfg)
        body["tenants"]["lone"]["instances"]["w-0"]["ticks"] = "2001-01-01 00:00"
        path.write_bytes(runtime_state.encode(body))
        second = DaemonProc(cfg)
        try:
            wait_until(
                lambda: _status_pids(cfg)["lone:w-0"] != old, 30, "the lost worker restarted"
            )
            with Client(cfg.socket) as c:
                (w,) = c.call("status")
            assert w["restarts"] >= 1 and w["exit_reason"] == "exit:unknown", w
            assert "worker lost while no daemon ran" in second.output()
            assert pid_alive(old), "the unverified process was signalled"
            assert second.stop() == 0
        finally:
            if second.proc.poll() is None:
                second.proc.kill()
                second.proc.wait(timeout=30)
        assert pid_alive(old), "the unverified process was stopped with the daemon"
    finally:
        flag.touch()
    wait_until(lambda: not pid_alive(old), 30, "the old run to end by itself")


def _status_pids(cfg: ConfigDir) -> dict[str, int]:
    def all_running() -> bool:
        with Client(cfg.socket) as c:
            return {w["state"] for w in c.call("status")} == {"running"}

    wait_until(all_running, 30, "every worker running")
    with Client(cfg.socket) as c:
        return {w["name"]: w["pid"] for w in c.call("status")}


# -- the daemon as a subprocess with the poll(2) I/O back end ---------------------------


def test_subprocess_daemon_on_poll_io_reports_it(
    qnx_sim: Sim, cfg: ConfigDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on QNX: no epoll there, so the daemon runs trio on poll(2) with the qnx backend.
    monkeypatch.setenv("SUPERVISORD_QNX_IO", "poll")
    two_beat_tenants(qnx_sim, cfg)
    cfg.write(backend="qnx")
    d = DaemonProc(cfg)
    try:
        with Client(cfg.socket) as c:
            version = c.call("version")
        assert version["io"] == "poll" and version["backend"] == "qnx"
        # What trio runs, seen from outside: no epoll instance in the daemon.
        assert epoll_fds(d.proc.pid) == 0
        assert len(_status_pids(cfg)) == 2
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=30)


# -- admission through the CLI ----------------------------------------------------------


def _check(cfg: ConfigDir, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``--check`` as an operator runs it, or (``check=False``) a real start."""
    return subprocess.run(
        [DAEMON, "--config", str(cfg.path), *(["--check"] if check else []), "--backend", "qnx"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )


def test_check_refuses_a_partition_name_aps_cannot_take(qnx_sim: Sim, cfg: ConfigDir) -> None:
    cfg.partitions = group_partition(qnx_sim.group) + textwrap.dedent(
        """
        [[partition]]
        name = "System"
        cpu = { budget = 5 }
        """
    )
    # A valid tenant beside the bad partition: a daemon that started what it could
    # would create the group's and this tenant's APS partitions.
    qnx_sim.tenant(
        cfg,
        "fine",
        f"""
        cpu = {{ budget = 10 }}
        [[worker]]
        name = "beat"
        command = {BEAT}
        """,
    )
    cfg.write(backend="portable")  # --backend qnx overrides it
    for started in (_check(cfg), _check(cfg, check=False)):
        assert started.returncode == 2, started.stdout + started.stderr
        located = [line for line in started.stderr.splitlines() if line.startswith("/")]
        assert len(located) == 1, started.stderr
        assert located[0].startswith(f"{cfg.path}: daemon.backend=qnx: ")
        assert "partition 'System' has no valid APS partition name" in located[0]
        assert "boot partition" in located[0]
        assert "1 problem; nothing was started." in started.stderr.splitlines()
        assert set(aps_partitions()) == {"System"}, "no partition was created"
        assert not cfg.socket.exists()


def test_check_refuses_more_partitions_than_aps_allows(qnx_sim: Sim, cfg: ConfigDir) -> None:
    # 32 budgeted tenants + the budgeted group = 33, plus System: over QNX 7's 32.
    for i in range(32):
        qnx_sim.tenant(
            cfg,
            f"t{i:02d}",
            f"""
            cpu = {{ budget = 2 }}
            [[worker]]
            name = "beat"
            command = {BEAT}
            """,
        )
    cfg.partitions = group_partition(qnx_sim.group, 70)
    cfg.write(backend="qnx")
    proc = _check(cfg)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "33 partitions set cpu.budget" in proc.stderr
    assert "at most 32 including System" in proc.stderr
    assert "1 problem;" in proc.stderr
    # The same config with two tenants left passes: the limit was the only problem.
    for i in range(2, 32):
        (cfg.root / "tenants.d" / f"t{i:02d}.toml").unlink()
    assert _check(cfg).returncode == 0


# -- transient jobs ----------------------------------------------------------------------


async def test_a_job_runs_in_its_tenants_aps_partition_and_is_killed_at_its_own_max(
    qnx_sim: Sim, cfg: ConfigDir, start_daemon
) -> None:
    qnx_sim.tenant(
        cfg,
        "host",
        f"""
        memory = {{ max = "96MiB" }}
        cpu = {{ budget = 10 }}
        [[worker]]
        name = "beat"
        command = {BEAT}
        """,
    )
    d = await start_daemon(backend="qnx")
    # Says where it runs, then grows 4 MiB every 50 ms: past the job's 32 MiB long before
    # the tenant's 96 MiB or RLIMIT_DATA (2 x 32 MiB) could stop it.
    grow = (
        "import time\n"
        "print(open('/proc/self/cgroup').read(), flush=True)\n"
        "chunks = []\n"
        "while True:\n"
        "    chunks.append(bytearray(4 << 20)); time.sleep(0.05)\n"
    )
    path = f"{qnx_sim.group}/host"
    result = await d.call(
        "run", partition=path, command=[PY, "-c", grow], memory="32MiB", pids=8, wait=True
    )
    assert result["exit_reason"] == "memory-limit" and result["exit_code"] == 123, result
    # At the job's own max, not the tenant's.
    limits = await d.call("events", kind="memory-limit")
    assert [e["partition"] for e in limits] == [f"{path}/job-1"], limits
    # APS has no task limit: under best-effort the job ran and was told so.
    assert any("pids" in w for w in result["warnings"]), result["warnings"]
    # The job's processes joined the tenant's APS partition (its own has no budget).
    out = (await d.call("job", id=result["job"]))["output"].decode()
    assert f":/{qnx_sim.cgroup.name}/{qnx_sim.aps('host')}\n" in out, out
    assert f"{path}/job-1" not in d.daemon.tree
    assert [w["name"] for w in await d.call("status")] == ["host:beat-0"]


def test_seccomp_is_refused_under_strict_and_said_under_best_effort(
    qnx_sim: Sim, cfg: ConfigDir
) -> None:
    """QNX has no seccomp (procmgr abilities are its tool): the key is a control the qnx
    backend does not enforce, so `strict` refuses the config, naming file and key, and
    `best-effort` starts with a warning."""
    path = cfg.tenant(
        "sc",
        f'parent = "{qnx_sim.group}"\nseccomp = "default"\n'
        '[[worker]]\nname = "w"\ncommand = ["true"]\n',
    )
    daemon_file = cfg.write(backend="qnx")
    config = load(daemon_file)
    _, warnings = admit(config, make_backend(config))
    assert warnings == [
        f"partition '{qnx_sim.group}/sc' asks for seccomp, which the qnx backend does not enforce"
    ]
    daemon_file.write_text(
        daemon_file.read_text().replace('enforcement = "best-effort"', 'enforcement = "strict"')
    )
    config = load(daemon_file)
    with pytest.raises(ConfigError) as info:
        admit(config, make_backend(config))
    assert [str(p) for p in info.value.problems] == [
        f"{path}: seccomp: partition '{qnx_sim.group}/sc' asks for seccomp, which the qnx "
        'backend does not enforce (set [daemon] enforcement = "best-effort" to run anyway)'
    ]
