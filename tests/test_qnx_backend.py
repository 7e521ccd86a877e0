"""The qnx backend against qnx-sim: real processes, real cgroup v1 cpu, no mocks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from supervisord_qnx.partition import accounting
from supervisord_qnx.partition.backend import (
    BackendError,
    BackendEvent,
    Control,
    Enforcement,
    EventKind,
    SpawnRequest,
)
from supervisord_qnx.partition.qnx import QnxBackend
from supervisord_qnx.partition.qnx_names import aps_name, collisions, is_valid
from supervisord_qnx.partition.tree import Partition, PartitionTree
from supervisord_qnx.supervise.reaper import become_subreaper
from tests.test_qnx_sim import CPU, SIM_BIN, cgroup_cpu_or_skip

MiB = 1 << 20
PY = sys.executable


@pytest.fixture
def sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """qnx-sim on PATH with a private state dir and cgroup root; the backend's `aps`."""
    cgroup = f"qnx-backend-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("PATH", f"{SIM_BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("QNX_SIM_STATE", str(tmp_path / "qnx-state"))
    monkeypatch.setenv("QNX_SIM_CGROUP", cgroup)
    yield CPU / cgroup
    reset = [PY, str(SIM_BIN / "qnx-sim-reset"), "--kill"]
    subprocess.run(reset, check=False, timeout=30)


def tree_of(*nodes: Partition) -> PartitionTree:
    tree = PartitionTree()
    for node in nodes:
        parent = node.path.rsplit("/", 1)[0] if "/" in node.path else ""
        tree.add(node, parent)
    return tree


def aps_partitions() -> dict[str, dict[str, str]]:
    out = subprocess.run(
        ["aps", "show", "-f", "partitions"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    rows = {}
    for line in out.splitlines()[2:]:
        if "|" in line:
            head, budget, maximum, *_ = (f.strip() for f in line.split("|"))
            name, pid, parent = head.split()
            rows[name] = {"id": pid, "parent": parent, "budget": budget, "max": maximum}
    return rows


def request(
    partition: str, leaf: str, argv: list[str], out: int, env: dict[str, str] | None = None
) -> SpawnRequest:
    return SpawnRequest(
        partition=partition,
        leaf=leaf,
        argv=argv,
        cwd=None,
        env={"PATH": os.environ["PATH"], **(env or {})},
        stdout=out,
        stderr=out,
    )


def cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rfind(")") + 2 :].split()
    return int(rest[11]) + int(rest[12])


# -- names (pure) ----------------------------------------------------------------------


def test_short_paths_keep_readable_names() -> None:
    assert aps_name("tenants") == "tenants"
    assert aps_name("tenants/web") == "tenants.web"
    assert aps_name("a/b/c") == "a.b.c"


def test_long_paths_map_to_valid_unique_deterministic_names() -> None:
    paths = [f"tenants/customer-{i:04d}/worker_pool" for i in range(500)]
    paths += ["tenants/averyveryverylongname", "tenants/a.b", "a/b.c", "x" * 63]
    names = [aps_name(p) for p in paths]
    assert all(is_valid(n) and len(n) <= 15 for n in names)
    assert len(set(names)) == len(names)
    assert names == [aps_name(p) for p in paths]  # deterministic across calls
    assert aps_name("tenants/averyveryverylongname").startswith("averyver+")
    # A dotted component is hashed, so "a/b.c" and "a.b/c" can never meet as "a.b.c".
    assert aps_name("a/b.c") != aps_name("a.b/c") and "+" in aps_name("a/b.c")
    assert collisions(["tenants/x", "tenants/x", "other"]) == {"tenants.x": ["tenants/x"] * 2}


def test_check_reports_unmappable_paths_and_the_partition_limit() -> None:
    backend = QnxBackend(max_partitions=4)
    ok = tree_of(Partition("a", cpu_budget=10), Partition("b", cpu_budget=10))
    assert backend.check(ok) == []
    bad = tree_of(Partition("System", cpu_budget=5), Partition("has space", cpu_budget=5))
    problems = backend.check(bad)
    assert any("'System'" in p and "boot partition" in p for p in problems)
    assert any("'has space'" in p for p in problems)
    many = tree_of(*(Partition(f"t{i}", cpu_budget=5) for i in range(4)))
    (limit,) = backend.check(many)
    assert "4 partitions set cpu.budget" in limit and "at most 4 including System" in limit
    # Partitions without a budget need no APS partition and do not count.
    assert backend.check(tree_of(*(Partition(f"t{i}") for i in range(10)))) == []


def test_enforcement_is_honest() -> None:
    levels = QnxBackend().enforcement()
    assert levels[Control.CPU_BUDGET] is Enforcement.KERNEL
    assert levels[Control.CPU_MAX] is Enforcement.KERNEL
    assert levels[Control.MEMORY_MAX] is Enforcement.SUPERVISED
    assert levels[Control.MEMORY_RESERVED] is Enforcement.SUPERVISED
    assert levels[Control.MEMORY_ISOLATION] is Enforcement.KERNEL
    for control in (Control.MEMORY_MIN, Control.PIDS, Control.CONTAINER):
        assert levels[control] is Enforcement.NONE
    assert QnxBackend(limit_cpu_usage=False).enforcement()[Control.CPU_MAX] is Enforcement.NONE


def test_describe_reports_the_mapping() -> None:
    tree = tree_of(
        Partition("tenants", flags=frozenset({"hierarchical"}), cpu_budget=80),
        Partition("tenants/web", cpu_budget=20, cpu_max=50, memory_max=64 * MiB),
        Partition("tenants/web/extra"),
        Partition("misc"),
    )
    described = QnxBackend().describe(tree)
    assert described["tenants/web"].startswith("APS partition tenants.web (budget 20%, max 50%")
    assert "parent tenants" in described["tenants/web"]
    assert described["tenants/web/extra"].startswith("runs in APS partition tenants.web")
    assert described["misc"] == "runs in the daemon's own APS partition"


def test_probe_needs_the_utilities(sim: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert QnxBackend.probe() is None
    monkeypatch.setenv("PATH", "/nonexistent")
    reason = QnxBackend.probe()
    assert reason is not None and "'aps'" in reason and "qnx-sim" in reason


# -- partitions against the simulator ---------------------------------------------------


def test_nested_partitions_take_budget_from_their_parent(sim: Path) -> None:
    backend = QnxBackend()
    tenants = Partition("tenants", flags=frozenset({"hierarchical"}), cpu_budget=80)
    tree = tree_of(tenants, Partition("tenants/a", cpu_budget=20))
    for node in tree:
        backend.create(node)
    rows = aps_partitions()
    assert rows["tenants.a"]["parent"] == rows["tenants"]["id"]
    assert rows["tenants"]["budget"] == "60%" and rows["System"]["budget"] == "20%"
    # destroy hands the budget back (APS cannot delete); a re-create reuses the name.
    backend.destroy("tenants")
    rows = aps_partitions()
    assert rows["tenants"]["budget"] == "0%" and rows["tenants.a"]["budget"] == "0%"
    assert rows["System"]["budget"] == "100%"
    again = QnxBackend()  # a new daemon after restart
    for node in tree:
        again.create(node)
    rows = aps_partitions()
    assert rows["tenants"]["budget"] == "60%" and rows["tenants.a"]["budget"] == "20%"


def test_create_over_budgets_a_crashed_daemon_left_takes_them_back(sim: Path) -> None:
    tree = tree_of(
        Partition("tenants", flags=frozenset({"hierarchical"}), cpu_budget=90),
        Partition("tenants/a", cpu_budget=20),
        Partition("tenants/b", cpu_budget=60),
    )
    for node in tree:
        QnxBackend().create(node)  # then no destroy: the daemon was SIGKILLed
    assert aps_partitions()["System"]["budget"] == "10%"
    smaller = tree_of(  # and the new config moved budget from b to a
        Partition("tenants", flags=frozenset({"hierarchical"}), cpu_budget=90),
        Partition("tenants/a", cpu_budget=50),
        Partition("tenants/b", cpu_budget=30),
    )
    again = QnxBackend()
    for node in smaller:
        again.create(node)
    rows = aps_partitions()
    budgets = [rows[n]["budget"] for n in ("System", "tenants", "tenants.a", "tenants.b")]
    assert budgets == ["10%", "10%", "50%", "30%"]
    # A partition the new config no longer names keeps its budget: the error says how
    # to free it rather than leaving the operator with aps's bare EINVAL.
    again.destroy("tenants")
    subprocess.run(["aps", "create", "-b", "95", "grp"], check=True, timeout=60)
    subprocess.run(
        ["on", "-X", "aps=grp", "aps", "create", "-b", "10", "gone"], check=True, timeout=60
    )
    with pytest.raises(BackendError) as info:
        QnxBackend().create(tree_of(Partition("grp", cpu_budget=95))["grp"])
    assert "left by an earlier run" in str(info.value) and "aps modify -b 0" in str(info.value)


def test_create_failure_names_partition_command_and_stderr(sim: Path) -> None:
    subprocess.run(["aps", "create", "-b", "90", "hog"], check=True, timeout=60)
    with pytest.raises(BackendError) as info:
        QnxBackend().create(tree_of(Partition("greedy", cpu_budget=20))["greedy"])
    message = str(info.value)
    assert "partition 'greedy'" in message and "aps create -b 20" in message
    assert "exceeds the 10%" in message


def test_cpu_max_sets_limit_cpu_usage_and_a_quota(sim: Path) -> None:
    cgroup_cpu_or_skip()
    backend = QnxBackend()
    backend.create(tree_of(Partition("capped", cpu_budget=10, cpu_max=25))["capped"])
    quota = int((sim / "capped" / "cpu.cfs_quota_us").read_text())
    assert quota == 25_000 * (os.cpu_count() or 1)
    assert aps_partitions()["capped"]["max"] == "25%"


def test_rlimits_are_in_place_before_exec(sim: Path, tmp_path: Path) -> None:
    backend = QnxBackend()
    node = Partition("lim", flags=frozenset({"memory-isolation"}), memory_max=64 * MiB)
    backend.create(tree_of(node)["lim"])
    log = tmp_path / "limits.log"
    with open(log, "wb") as out:
        # The worker's first action: print its own limits.
        proc = backend.spawn(request("lim", "w-0", ["cat", "/proc/self/limits"], out.fileno()))
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    data = re.search(r"Max data size\s+(\S+)\s+(\S+)", text)
    core = re.search(r"Max core file size\s+(\S+)\s+(\S+)", text)
    assert data is not None and core is not None
    assert data.groups() == (str(128 * MiB), str(128 * MiB))  # 2 x max, see portable.py
    assert core.groups() == ("0", "0")


SPIN = ["taskset", "-c", "0", PY, "-c", "while True: pass"]


def test_cpu_shares_follow_budgets_20_and_60(sim: Path, tmp_path: Path) -> None:
    cgroup_cpu_or_skip()
    backend = QnxBackend()
    tree = tree_of(Partition("low", cpu_budget=20), Partition("high", cpu_budget=60))
    for node in tree:
        backend.create(node)
    procs = []
    with open(tmp_path / "spin.log", "wb") as out:
        try:
            for path in ("low", "high"):
                procs.append(backend.spawn(request(path, "spin-0", SPIN, out.fileno())))
            # Both running and pinned before measuring: `on` execs `taskset`, which pins
            # and execs Python; on a loaded machine that chain takes a moment.
            deadline = time.monotonic() + 15
            while any(os.sched_getaffinity(p.pid) != {0} for p in procs):
                assert time.monotonic() < deadline, "taskset never pinned the spinners"
                time.sleep(0.05)
            for proc, path in zip(procs, ("low", "high"), strict=True):
                assert f"/{path}\n" in Path(f"/proc/{proc.pid}/cgroup").read_text()
            before = [cpu_ticks(p.pid) for p in procs]
            time.sleep(3.0)
            after = [cpu_ticks(p.pid) for p in procs]
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(timeout=30)
    low, high = (a - b for a, b in zip(after, before, strict=True))
    print(f"CPU ticks over 3 s on one core: low(20%)={low} high(60%)={high}")
    assert low > 0, "the 20% partition must not starve: budgets are guaranteed minimums"
    # cpu.shares 2000:6000 -> 1:3; others' load on CPU 0 blurs it, hence the band.
    assert 2.0 <= high / low <= 4.5, f"ratio {high / low:.2f} outside 2..4.5"


HOG = """
import os, sys, time
kids = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        block = bytearray(30 * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(600)
        os._exit(0)
    kids.append(pid)
time.sleep(600)
"""


async def test_memory_accounting_kills_the_partition_over_max_only(
    sim: Path, tmp_path: Path
) -> None:
    backend = QnxBackend(sample_interval=0.1)
    tree = tree_of(
        Partition("hog", memory_max=64 * MiB, memory_reserved=8 * MiB),
        Partition("calm", memory_max=64 * MiB),
    )
    for node in tree:
        backend.create(node)
    events: list[BackendEvent] = []
    out = os.open(tmp_path / "mem.log", os.O_WRONLY | os.O_CREAT, 0o600)
    # Each of the hog's three processes stays under its own RLIMIT_DATA (128 MiB), but
    # together they pass the partition's 64 MiB: only the accounting can catch that.
    hog = backend.spawn(request("hog", "w-0", [PY, "-c", HOG], out))
    calm = backend.spawn(request("calm", "w-0", ["sleep", "600"], out))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.watch, tree, events.append)
            with trio.fail_after(20):
                while not any(e.kind is EventKind.MEMORY_LIMIT for e in events):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert hog.wait(timeout=10) == -9
        assert backend.leaf_exit_reason("hog", "w-0") == "memory-limit"
        assert calm.poll() is None, "the sibling partition must be untouched"
        assert backend.leaf_exit_reason("calm", "w-0") is None
        assert {e.partition for e in events} == {"hog"}
        limit = next(e for e in events if e.kind is EventKind.MEMORY_LIMIT)
        assert int(str(limit.detail["current"])) > 64 * MiB
        assert backend.pids("hog") == []
    finally:
        for proc in (hog, calm):
            proc.kill()
            proc.wait(timeout=30)
        os.close(out)


ESCAPE = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open(sys.argv[1], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
    os._exit(0)
time.sleep(600)
"""


def test_pids_finds_descendants_that_left_the_session(sim: Path, tmp_path: Path) -> None:
    # As in the daemon: orphans come back to us (a child subreaper) rather than to init,
    # so accounting finds them among our descendants whichever test ran before.
    assert become_subreaper()
    backend = QnxBackend()
    backend.create(tree_of(Partition("esc"))["esc"])
    marker = tmp_path / "grandchild.pid"
    with open(tmp_path / "esc.log", "wb") as out:
        main = backend.spawn(request("esc", "w-0", [PY, "-c", ESCAPE, str(marker)], out.fileno()))
    try:
        deadline = time.monotonic() + 20
        while not (marker.exists() and marker.read_text()):
            assert time.monotonic() < deadline, "the escaping grandchild never started"
            time.sleep(0.05)
        orphan = int(marker.read_text())
        found = backend.pids("esc", "w-0")
        assert main.pid in found and orphan in found
        tag = Path(f"/proc/{orphan}/environ").read_bytes()
        assert f"{accounting.TAG}=esc:w-0".encode() in tag
        backend.destroy("esc")
        deadline = time.monotonic() + 10
        while Path(f"/proc/{orphan}").exists() and "Z" not in _state(orphan):
            assert time.monotonic() < deadline, "destroy left the orphan running"
            time.sleep(0.05)
    finally:
        main.kill()
        main.wait(timeout=30)


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "Z"
    return stat[stat.rfind(")") + 2 :].split()[0]
