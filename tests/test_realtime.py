"""Real-time tenants (docs/realtime.md): scheduling policy, priority, CPU affinity, cpuset
partitions and memory locking, through the real daemon and the kernel's own answers.

Each worker prints what the kernel says about itself as its very first statements, so
the assertions see the settings in force from its first instruction (applied before
exec), not a later fix-up. ``status`` is checked to read the same values back from the
kernel. Load-time refusals are checked as the operator sees them: file, key, reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisord_qnx.config.load import ConfigError, load
from supervisord_qnx.partition.process import ProcessSettings, apply_self, wrapped_argv
from tests.cgroup_helpers import CgroupRoot
from tests.conftest import ConfigDir, worker_py
from tests.daemonproc import ctl
from tests.test_daemon_qnx import Sim, qnx_sim  # noqa: F401 - the fixture
from tests.test_qnx_sim import cgroup_cpu_or_skip
from tests.test_wasm_prefork import HEARTBEAT, ppid

pytestmark = pytest.mark.integration

TWO_CPUS = (os.cpu_count() or 1) >= 2
needs_two = pytest.mark.skipif(not TWO_CPUS, reason="pinning to CPU 1 needs a second CPU")

# The worker's first statements: what the kernel applied to it before its program ran.
SELF_REPORT = (
    "import os, resource, json, time\n"
    "print(json.dumps({'policy': os.sched_getscheduler(0),"
    " 'priority': os.sched_getparam(0).sched_priority,"
    " 'cpus': sorted(os.sched_getaffinity(0)),"
    " 'memlock': resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]}), flush=True)\n"
    "time.sleep(1000)\n"
)


async def first_report(cfg: ConfigDir, tenant: str, leaf: str) -> dict:
    log = cfg.worker_log(tenant, leaf)
    with trio.fail_after(15):
        while not (log.exists() and log.read_text().strip()):
            await trio.sleep(0.02)
    return dict(json.loads(log.read_text().splitlines()[0]))


def allowed_list(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


@needs_two
async def test_fifo_worker_pinned_to_cpu1_from_its_first_instruction(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    # cpu.max 20 % bounds the real-time tenant (the safety rail), and under RT group
    # scheduling gives its cgroups 200 ms of RT runtime per second.
    cfg.tenant(
        "ctl",
        f"""
        cpu = {{ max = 20 }}
        [[worker]]
        name = "loop"
        command = {worker_py(SELF_REPORT)}
        sched = {{ policy = "fifo", priority = 10 }}
        cpus = [1]
        memlock = "4MiB"
        """,
    )
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    seen = await first_report(cfg, "ctl", "loop-0")
    assert seen == {"policy": os.SCHED_FIFO, "priority": 10, "cpus": [1], "memlock": 4 << 20}
    w = await d.wait_for("ctl:loop-0", lambda w: w["state"] == "running")
    # status reads the live process back from the kernel, not the config.
    assert w["sched"] == {"policy": "fifo", "priority": 10, "nice": 0, "cpus": "1"}
    # The partition's RT runtime is what made SCHED_FIFO possible inside its cgroup.
    leaf_rt = cg.dir("cpu", "tenants", "ctl", "@loop-0") / "cpu.rt_runtime_us"
    if leaf_rt.exists():
        assert int(leaf_rt.read_text()) == 200_000
    table = await trio.to_thread.run_sync(ctl, cfg.socket, "status")
    header, row = table.stdout.splitlines()[:2]
    assert "SCHED" in header and "CPUS" in header
    assert "fifo/10" in row.split() and row.split()[-1] == "1"


@needs_two
async def test_cpuset_partition_keeps_its_workers_on_cpu1(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    cfg.tenant(
        "pinned",
        f"""
        cpuset = "1"
        [[worker]]
        name = "w"
        command = {worker_py(SELF_REPORT)}
        instances = 2
        """,
    )
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    for leaf in ("w-0", "w-1"):
        assert (await first_report(cfg, "pinned", leaf))["cpus"] == [1]
        w = await d.wait_for(f"pinned:{leaf}", lambda w: w["state"] == "running")
        assert allowed_list(w["pid"]) == "1"
        assert w["sched"]["cpus"] == "1" and w["sched"]["policy"] == "other"
    # The kernel's own file, and the partitions report.
    assert cg.dir("cpuset", "tenants", "pinned").joinpath("cpuset.cpus").read_text().strip() == "1"
    report = await d.call("partitions")
    tenants = next(c for c in report["tree"]["children"] if c["path"] == "tenants")
    pinned = next(c for c in tenants["children"] if c["path"] == "tenants/pinned")
    assert pinned["cpuset"] == "1" and tenants["cpuset"] is None
    assert report["enforcement"]["cpuset"] == "kernel"
    table = (await trio.to_thread.run_sync(ctl, cfg.socket, "partitions")).stdout.splitlines()
    header = next(ln for ln in table if ln.startswith("PARTITION"))
    row = next(ln for ln in table if ln.strip().startswith("pinned"))
    assert header.split()[-1] == "CPUSET" and row.split()[-1] == "1", table


def _write(cfg: ConfigDir, partitions: str, tenants: dict[str, str], **daemon: Any) -> Path:
    cfg.partitions = textwrap.dedent(partitions)
    for name, body in tenants.items():
        cfg.tenant(name, body)
    return cfg.write(**daemon)


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return [str(p) for p in info.value.problems]


@needs_two
def test_a_child_asking_for_a_cpu_outside_its_parents_cpuset_is_rejected(cfg: ConfigDir) -> None:
    path = _write(
        cfg,
        """
        [[partition]]
        name = "tenants"
        flags = ["hierarchical"]
        cpuset = "1"
        """,
        {
            "child": 'cpuset = "0"\n[[worker]]\nname = "w"\ncommand = ["true"]\n',
            "pinner": '[[worker]]\nname = "w"\ncommand = ["true"]\ncpus = [0]\n',
        },
    )
    tdir = cfg.root / "tenants.d"
    assert sorted(_problems(path)) == [
        f"{tdir / 'child.toml'}: cpuset: cpuset 0 of 'tenants/child' is not inside the "
        "cpuset 1 of 'tenants': CPU 0 is not its parent's to give",
        f"{tdir / 'pinner.toml'}: worker[0].cpus: CPU 0 is outside the cpuset 1 of "
        "partition 'tenants/pinner'",
    ]


def test_an_unbounded_fifo_tenant_is_refused_unless_the_daemon_allows_it(cfg: ConfigDir) -> None:
    body = '[[worker]]\nname = "w"\ncommand = ["true"]\nsched = { policy = "fifo", priority = 5 }\n'
    path = _write(cfg, cfg.partitions, {"rt": body})
    assert _problems(path) == [
        f"{cfg.root / 'tenants.d' / 'rt.toml'}: worker[0].sched.policy: policy 'fifo' can "
        "starve the machine: give partition 'tenants/rt' a cpu.max below 100% of its "
        "CPUs, or set [daemon] allow_unbounded_realtime = true"
    ]
    # A cpu.max of the whole machine is no bound either.
    cfg.tenant("rt", "cpu = { max = 100 }\n" + body)
    assert len(_problems(cfg.path)) == 1
    cfg.tenant("rt", "cpu = { max = 50 }\n" + body)
    assert load(cfg.path).tree["tenants/rt"].rt_runtime_us == 500_000
    cfg.tenant("rt", body)
    cfg.write(allow_unbounded_realtime=True)
    assert load(cfg.path).tenants[0].worker[0].sched is not None


def test_bad_realtime_values_name_file_key_and_reason(cfg: ConfigDir) -> None:
    w = '[[worker]]\nname = "w"\ncommand = ["true"]\n'
    bad = {
        "prio": w + 'sched = { policy = "rr", priority = 100 }\n',
        "other": 'sched = { policy = "other", priority = 3 }\n' + w,
        "cpu": w + "cpus = [4096]\n",
        "set": 'cpuset = "1-0"\n' + w,
    }
    path = _write(cfg, cfg.partitions, bad)
    tdir = cfg.root / "tenants.d"
    got = sorted(_problems(path))
    assert got == sorted(
        [
            f"{tdir / 'prio.toml'}: worker[0].sched: priority 100 is outside 1..99, the "
            "range of policy 'rr' on this kernel",
            f"{tdir / 'other.toml'}: sched: priority 3 is outside 0..0, the range of policy "
            "'other' on this kernel",
            f"{tdir / 'cpu.toml'}: worker[0].cpus: CPU 4096 does not exist on this machine "
            f"(it has CPUs {'0-' + str((os.cpu_count() or 1) - 1) if TWO_CPUS else '0'})",
            f"{tdir / 'set.toml'}: cpuset: '1-0' in '1-0' is not an ascending CPU range",
        ]
    )


def test_a_workers_keys_override_its_tenants(cfg: ConfigDir) -> None:
    from supervisord_qnx.config.realtime import effective

    path = _write(
        cfg,
        cfg.partitions,
        {
            "t": """
            sched = { policy = "batch", nice = 5 }
            cpus = [0]
            [[worker]]
            name = "a"
            command = ["true"]
            [[worker]]
            name = "b"
            command = ["true"]
            sched = { policy = "idle" }
            memlock = "1MiB"
            """
        },
    )
    t = load(path).tenants[0]
    assert effective(t, t.worker[0]) == ProcessSettings(
        sched_policy="batch", nice=5, cpus=(0,), memlock=None
    )
    assert effective(t, t.worker[1]) == ProcessSettings(
        sched_policy="idle", cpus=(0,), memlock=1 << 20
    )


def test_exec_wrappers_and_apply_self_agree(tmp_path: Path) -> None:
    """The two ways in (exec wrappers for exec'd workers, ``apply_self`` for the fork
    server's children) give a process the same settings."""
    settings = ProcessSettings(sched_policy="batch", nice=7, cpus=(0,), memlock=1 << 20)
    probe = (
        "import os, resource; print(os.sched_getscheduler(0), "
        "os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0)), "
        "resource.getrlimit(resource.RLIMIT_MEMLOCK))"
    )
    import subprocess
    import sys

    wrapped = subprocess.run(
        wrapped_argv(settings, [sys.executable, "-c", probe]),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    script = tmp_path / "self.py"
    script.write_text(
        "import sys\n"
        "from supervisord_qnx.partition.process import ProcessSettings, apply_self\n"
        f"apply_self(ProcessSettings.from_dict({settings.as_dict()!r}))\n"
        f"exec({probe!r})\n"
    )
    applied = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert wrapped == applied == f"{os.SCHED_BATCH} 7 [0] ({1 << 20}, {1 << 20})\n"
    assert apply_self is not None


@needs_two
async def test_a_preforked_wasm_worker_gets_the_same_settings(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    # The fork server's child applies them to itself (apply_self), not through exec.
    cfg.tenant(
        "wrt",
        f"""
        cpu = {{ max = 20 }}
        memory = {{ max = "128MiB" }}
        [[worker]]
        name = "w"
        wasm = "{HEARTBEAT}"
        sched = {{ policy = "rr", priority = 7 }}
        cpus = [1]
        """,
    )
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    # The child applies the settings before the runner's first line; the daemon may
    # report `running` a moment earlier, so wait for the kernel's readback.
    w = await d.wait_for(
        "wrt:w-0", lambda w: w["state"] == "running" and (w["sched"] or {}).get("policy") == "rr"
    )
    assert d.daemon.supervisor.launchers.forkserver_pid is not None
    assert ppid(w["pid"]) == os.getpid()  # forked by the server, handed to the daemon
    assert w["sched"] == {"policy": "rr", "priority": 7, "nice": 0, "cpus": "1"}
    assert allowed_list(w["pid"]) == "1"


@needs_two
async def test_qnx_maps_them_to_on_options_and_a_critical_budget(
    qnx_sim: Sim,  # noqa: F811 - the fixture imported above
    cfg: ConfigDir,
    start_daemon,
) -> None:
    cgroup_cpu_or_skip()
    qnx_sim.tenant(
        cfg,
        "ctl",
        f"""
        cpuset = "1"
        cpu = {{ budget = 20, max = 30, critical = {{ budget_ms = 20, priority = 10 }} }}
        [[worker]]
        name = "loop"
        command = {worker_py(SELF_REPORT)}
        sched = {{ policy = "fifo", priority = 10 }}
        memlock = "2MiB"
        """,
    )
    d = await start_daemon(backend="qnx")
    seen = await first_report(cfg, "ctl", "loop-0")
    assert seen == {"policy": os.SCHED_FIFO, "priority": 10, "cpus": [1], "memlock": 2 << 20}
    w = await d.wait_for("ctl:loop-0", lambda w: w["state"] == "running")
    assert w["sched"] == {"policy": "fifo", "priority": 10, "nice": 0, "cpus": "1"}
    # The launcher line the daemon ran (`on` execs, so ask the backend for it).
    backend = d.daemon.backend
    node = d.daemon.tree[f"{qnx_sim.group}/ctl"]
    settings = ProcessSettings(sched_policy="fifo", sched_priority=10, memlock=2 << 20)
    argv = backend.launch_argv(node, ["prog"], settings)
    assert argv[1:] == [
        "-p", "10f", "-R", "0x2", "-L", f"MEMLOCK:{2 << 20}:{2 << 20}",
        "-X", f"aps={qnx_sim.aps('ctl')}", "--", "prog",
    ]  # fmt: skip
    # The critical budget is the APS partition's (`aps show`), and qnx-sim turns it into
    # the RT group runtime that let the fifo worker run inside its cgroup.
    show = subprocess.run(
        ["aps", "show", "-f", "partitions"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    line = next(
        ln for ln in show.splitlines() if ln.split() and ln.split()[0] == qnx_sim.aps("ctl")
    )
    assert "20ms" in line, show
    rt = qnx_sim.cgroup / qnx_sim.aps("ctl") / "cpu.rt_runtime_us"
    if rt.exists():
        assert int(rt.read_text()) == 200_000


def test_check_reports_rt_throttling_and_the_realtime_workers(cfg: ConfigDir) -> None:
    from tests.test_cli import DAEMON

    cfg.tenant(
        "ctl",
        """
        cpu = { max = 20 }
        [[worker]]
        name = "loop"
        command = ["true"]
        sched = { policy = "rr", priority = 3 }
        cpus = [0]
        """,
    )
    cfg.write()
    text = subprocess.run(
        [DAEMON, "--config", str(cfg.path), "--check"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    runtime = int(Path("/proc/sys/kernel/sched_rt_runtime_us").read_text())
    period = int(Path("/proc/sys/kernel/sched_rt_period_us").read_text())
    if runtime >= 0:
        assert f"RT throttling on: real-time tasks get at most {runtime} of every {period}" in text
    else:
        assert "RT throttling OFF" in text
    assert "  ctl:loop: rr/3, cpus 0, partition RT runtime 200000 µs/s\n" in text
    data = json.loads(
        subprocess.run(
            [DAEMON, "--config", str(cfg.path), "--check", "--json"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    )
    assert data["realtime"]["rt_throttling"]["runtime_us"] == runtime
    assert data["realtime"]["workers"][0]["policy"] == "rr"


async def test_reload_applies_a_tenants_new_sched_by_replacing_its_workers(
    cfg: ConfigDir, start_daemon
) -> None:
    body = """
        sched = {{ policy = "{policy}" }}
        [[worker]]
        name = "w"
        command = ["sleep", "1000"]
        """
    cfg.tenant("bg", body.format(policy="batch"))
    d = await start_daemon()
    # `running` comes with the pid, possibly before chrt has run: wait for the readback.
    w = await d.wait_for(
        "bg:w-0", lambda w: w["state"] == "running" and (w["sched"] or {}).get("policy") == "batch"
    )
    first_pid = w["pid"]
    cfg.tenant("bg", body.format(policy="idle"))
    result = await d.call("reload")
    assert "bg" in json.dumps(result)
    w = await d.wait_for(
        "bg:w-0", lambda w: w["state"] == "running" and (w["sched"] or {}).get("policy") == "idle"
    )
    assert w["sched"]["policy"] == "idle" and w["pid"] != first_pid  # a new process
