"""qnx-sim: the `aps`/`on` simulators run as real processes against real cgroups.

Every test gets its own state directory and cgroup root, so tests (and other engineers'
runs) never see each other's partitions; teardown is the simulator's "reboot".
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SIM_BIN = Path(__file__).resolve().parent.parent / "qnx-sim" / "bin"
CPU = Path("/sys/fs/cgroup/cpu")


def cgroup_cpu_or_skip() -> None:
    """Skip (with the reason) where cgroup v1 cpu cannot be written. Under
    SUPERVISORD_QNX_REQUIRE_CGROUPS=1 a skip on a writable controller is a failure."""
    reason = None
    if not (CPU / "cpu.shares").exists():
        reason = f"no cgroup v1 cpu controller at {CPU}"
    else:
        probe = CPU / f"qnx-sim-probe-{uuid.uuid4().hex[:8]}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            reason = f"cgroup v1 cpu at {CPU} is not writable: {exc.strerror}"
    if reason is None:
        return
    if os.environ.get("SUPERVISORD_QNX_REQUIRE_CGROUPS") == "1" and os.access(CPU, os.W_OK):
        pytest.fail(f"SUPERVISORD_QNX_REQUIRE_CGROUPS=1 but: {reason}")
    pytest.skip(reason)


class Sim:
    def __init__(self, state: Path, cgroup: str) -> None:
        self.state = state
        self.cgroup = cgroup
        self.env = {
            **os.environ,
            "PATH": f"{SIM_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "QNX_SIM_STATE": str(state),
            "QNX_SIM_CGROUP": cgroup,
        }

    def run(self, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv),
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=30,
        )

    def ok(self, *argv: str) -> str:
        proc = self.run(*argv)
        assert proc.returncode == 0, f"{argv}: rc={proc.returncode} stderr={proc.stderr}"
        return proc.stdout

    @property
    def root(self) -> Path:
        return CPU / self.cgroup

    def partitions(self) -> dict[str, dict[str, str]]:
        """Parse `aps show -f partitions` into name -> {id, parent, budget, max}."""
        rows = {}
        for line in self.ok("aps", "show", "-f", "partitions").splitlines()[2:]:
            if "|" not in line:
                continue
            head, budget, maximum, *_ = (f.strip() for f in line.split("|"))
            name, pid, parent = head.split()
            rows[name] = {"id": pid, "parent": parent, "budget": budget, "max": maximum}
        return rows


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    s = Sim(tmp_path / "state", f"qnx-sim-test-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    yield s
    s.run("qnx-sim-reset", "--kill")
    assert not s.root.exists()


def test_every_utility_says_it_is_a_simulator(sim: Sim) -> None:
    for tool in ("aps", "on", "qnx-sim-reset"):
        assert os.access(SIM_BIN / tool, os.X_OK)
        out = sim.ok(tool, "--help")
        assert "simulator of the QNX utility for Linux development" in out
    assert sim.run("aps").returncode == 2
    assert sim.run("on").returncode == 2


def test_create_takes_budget_from_system_and_show_lists_it(sim: Sim) -> None:
    sim.ok("aps", "create", "-b", "20", "alpha")
    sim.ok("aps", "create", "-b15", "-m", "40", "beta")  # -b15: the attached form QNX docs use
    parts = sim.partitions()
    assert parts["System"] == {"id": "0", "parent": "-", "budget": "65%", "max": "100%"}
    assert parts["alpha"]["budget"] == "20%" and parts["alpha"]["parent"] == "0"
    assert parts["beta"]["max"] == "40%"
    usage = sim.ok("aps", "show")
    assert usage.splitlines()[1].split()[:4] == ["Partition", "name", "id", "|"]
    assert any(line.startswith("alpha") and "20%" in line for line in usage.splitlines())
    assert "Total" in usage.splitlines()[-1]


def test_create_errors_are_documented_failures(sim: Sim) -> None:
    sim.ok("aps", "create", "-b", "70", "big")
    exists = sim.run("aps", "create", "-b", "1", "big")
    assert exists.returncode == 1 and "EEXIST" in exists.stderr
    over = sim.run("aps", "create", "-b", "31", "toomuch")
    assert over.returncode == 1
    assert "31%" in over.stderr and "30%" in over.stderr and "'System'" in over.stderr
    for bad in ("9lives", "a/b", "x" * 16):
        proc = sim.run("aps", "create", "-b", "1", bad)
        assert proc.returncode == 1 and "EINVAL" in proc.stderr, bad
    assert sim.run("aps", "create", "-b", "1", "x" * 15).returncode == 0
    assert sim.run("aps", "frobnicate").returncode == 2


def test_partition_limit_counts_system(sim: Sim) -> None:
    sim.ok("aps", "create", "-b", "1", "one")
    sim.ok("aps", "create", "-b", "1", "two")
    full = sim.run("aps", "create", "-b", "1", "three", QNX_SIM_APS_MAX="3")
    assert full.returncode == 1 and "3 partitions" in full.stderr


def test_state_persists_and_modify_moves_budget_back_to_the_parent(sim: Sim) -> None:
    sim.ok("aps", "create", "-b", "30", "svc")
    sim.ok("aps", "modify", "-b", "10", "svc")
    parts = sim.partitions()  # a fresh process reads what earlier ones wrote
    assert parts["svc"]["budget"] == "10%" and parts["System"]["budget"] == "90%"
    sim.ok("aps", "modify", "-b", "0", "svc")  # what the backend does instead of deleting
    assert sim.partitions()["System"]["budget"] == "100%"
    refused = sim.run("aps", "modify", "-b", "50", "System")
    assert refused.returncode == 1 and "children" in refused.stderr
    assert sim.run("aps", "modify", "-b", "5", "nosuch").returncode == 1


def test_nested_create_takes_budget_from_the_callers_partition(sim: Sim) -> None:
    sim.ok("aps", "create", "-b", "50", "tenants")
    sim.ok("on", "-X", "aps=tenants", "aps", "create", "-b", "20", "web")
    parts = sim.partitions()
    assert parts["web"]["parent"] == parts["tenants"]["id"]
    assert parts["tenants"]["budget"] == "30%" and parts["System"]["budget"] == "50%"
    over = sim.run("on", "-X", "aps=tenants", "--", "aps", "create", "-b", "31", "db")
    assert over.returncode == 1 and "'tenants' has left" in over.stderr


def test_on_applies_rlimits_env_and_partition_before_exec(sim: Sim) -> None:
    sim.ok("aps", "create", "-b", "10", "lim")
    out = sim.ok(
        "on", "-X", "aps=lim", "-L", "DATA:50000000:60000000", "-e", "GREETING=hi",
        "--", sys.executable, "-c",
        "import os,resource;print(resource.getrlimit(resource.RLIMIT_DATA),os.environ['GREETING'])",
    )  # fmt: skip
    assert out.split() == ["(50000000,", "60000000)", "hi"]
    assert "QNX_SIM_" not in sim.ok("on", "-X", "aps=lim", "env")  # the sim's own settings
    missing = sim.run("on", "-X", "aps=ghost", "true")
    assert missing.returncode == 1 and "ghost" in missing.stderr
    refused = sim.run("on", "-u", "nobody", "true")
    assert refused.returncode == 2 and "not simulated" in refused.stderr
    assert sim.run("on", "-L", "FREEMEM:900", "true").returncode == 2
    assert sim.run("on", "/no/such/program").returncode == 127


def test_cgroups_follow_budgets_and_max_with_limit_cpu_usage(sim: Sim) -> None:
    cgroup_cpu_or_skip()
    sim.ok("aps", "create", "-b", "20", "-m", "50", "a")
    sim.ok("aps", "create", "-b", "60", "b")
    assert (sim.root / "a" / "cpu.shares").read_text().strip() == "2000"
    assert (sim.root / "b" / "cpu.shares").read_text().strip() == "6000"
    # -m has effect only once limit_cpu_usage is set (QNX docs): then a CFS quota.
    assert (sim.root / "a" / "cpu.cfs_quota_us").read_text().strip() == "-1"
    sim.ok("aps", "modify", "-S", "limit_cpu_usage")
    ncpu = os.cpu_count() or 1
    quota = int((sim.root / "a" / "cpu.cfs_quota_us").read_text())
    assert quota == 50_000 * ncpu
    assert "limit_cpu_usage" in sim.ok("aps", "show", "-f", "scheduler")
    line = sim.ok("on", "-X", "aps=b", "cat", "/proc/self/cgroup")
    assert f"cpu:/{sim.cgroup}/b" in line


def test_join_moves_a_running_process(sim: Sim) -> None:
    cgroup_cpu_or_skip()
    sim.ok("aps", "create", "-b", "5", "late")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        sim.ok("aps", "join", "-p", str(sleeper.pid), "late")
        procs = (sim.root / "late" / "cgroup.procs").read_text().split()
        assert str(sleeper.pid) in procs
        assert sim.run("aps", "join", "-p", str(sleeper.pid), "nosuch").returncode == 1
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)


def test_show_usage_measures_a_busy_partition(sim: Sim) -> None:
    cgroup_cpu_or_skip()
    sim.ok("aps", "create", "-b", "30", "busy")
    spinner = subprocess.Popen(
        ["on", "-X", "aps=busy", sys.executable, "-c", "while True: pass"], env=sim.env
    )
    try:
        time.sleep(0.5)
        rows = sim.ok("aps", "show", "busy").splitlines()
        used = float(rows[3].split("|")[2].strip().rstrip("%"))
        # One spinning thread on an N-CPU machine is at most 100/N % of it; under load
        # from others it gets less, but it is never idle.
        assert used > 1.0
    finally:
        spinner.kill()
        spinner.wait(timeout=30)


def test_reset_is_the_reboot(sim: Sim) -> None:
    sim.ok("aps", "create", "-b", "10", "gone")
    sim.ok("qnx-sim-reset", "--kill")
    assert "gone" not in sim.partitions()
    assert not sim.root.exists()
    assert (
        not (sim.state / "partitions.json").exists()
        or "gone" not in (sim.state / "partitions.json").read_text()
    )
