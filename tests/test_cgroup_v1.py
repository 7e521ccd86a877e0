"""The cgroup v1 backend against the real kernel: no mocks.

Every test creates its partitions under a unique root (``supervisord-qnx.test-...``) and
the ``backend`` fixture kills and removes whatever is left, even when the test fails.
Without a writable v1 memory hierarchy the tests skip with the probe's reason; under
``SUPERVISORD_QNX_REQUIRE_CGROUPS=1`` that skip is a failure where the hierarchy is
writable (see ``tests/cgroup_helpers.py``).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from supervisord_qnx.config.load import ConfigError, load
from supervisord_qnx.daemon import admit
from supervisord_qnx.partition import cgroupfs as fs
from supervisord_qnx.partition import container
from supervisord_qnx.partition.backend import (
    BackendEvent,
    BackendUnavailable,
    Control,
    Enforcement,
    EventKind,
    SpawnRequest,
)
from supervisord_qnx.partition.cgroup_v1 import Cgroup1Backend
from supervisord_qnx.partition.tree import Partition, PartitionTree
from tests.cgroup_helpers import (
    alive,
    cleaned,
    require_cgroup1,
    tree_dirs,
    unique_instance,
    wait_for,
)

MiB = 1 << 20
HIER = frozenset({"hierarchical"})


@pytest.fixture
def instance() -> str:
    return unique_instance("v1")


@pytest.fixture
def backend(instance: str) -> Iterator[Cgroup1Backend]:
    require_cgroup1()
    with cleaned(Cgroup1Backend(instance=instance, sample_interval=0.05)) as b:
        yield b


def make_tree(backend: Cgroup1Backend, *nodes: tuple[str, dict[str, object]]) -> PartitionTree:
    tree = PartitionTree()
    for path, kw in nodes:
        parent = path.rpartition("/")[0]
        tree.add(Partition(path, **kw), parent)  # type: ignore[arg-type]
    assert tree.admit() == []
    for node in tree:
        backend.create(node)
    return tree


DEVNULL = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)  # workers' stdout by default


def request(partition: str, leaf: str, argv: list[str], stdout: int | None = None) -> SpawnRequest:
    return SpawnRequest(
        partition=partition,
        leaf=leaf,
        argv=argv,
        cwd=None,
        env=dict(os.environ),
        stdout=DEVNULL if stdout is None else stdout,
        stderr=2,
    )


def run_capture(backend: Cgroup1Backend, partition: str, leaf: str, argv: list[str]) -> str:
    r, w = os.pipe()
    try:
        proc = backend.spawn(request(partition, leaf, argv, stdout=w))
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    proc.wait(timeout=30)
    return out


def cgroup_lines(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(","):
            out[c] = path
    return out


# ---------------------------------------------------------------------------- attach


@pytest.mark.parametrize("strategy", ["thread", "preexec", "shim"])
def test_worker_first_instruction_runs_in_its_leaf(backend: Cgroup1Backend, strategy: str) -> None:
    backend.spawn_strategy = strategy  # type: ignore[assignment]
    make_tree(backend, ("tenants", {"flags": HIER}), ("tenants/web", {"memory_max": 64 * MiB}))
    # cat's first action is to read /proc/self/cgroup: if it names the leaf, the worker was
    # inside before its first instruction (nothing could have moved it in between).
    seen = cgroup_lines(run_capture(backend, "tenants/web", "web-0", ["cat", "/proc/self/cgroup"]))
    root_name = backend.roots[0].name
    # Its own leaf where a leaf means something (memory: its OOM kills and usage; cpu:
    # one CFS group per worker); its partition in cpuacct and pids; no cpuset is set on
    # the way, so the daemon's own cpuset (the CPUs our root has too).
    where = {
        "memory": "tenants/web/@web-0",
        "cpu": "tenants/web/@web-0",
        "cpuacct": "tenants/web",
        "pids": "tenants/web",
    }
    for controller, rel in where.items():
        if controller in backend._by_ctrl:
            assert seen[controller].endswith(f"/{root_name}/{rel}"), (controller, seen)
    if "cpuset" in backend._by_ctrl:
        assert seen["cpuset"] == cgroup_lines(Path("/proc/self/cgroup").read_text())["cpuset"]
    # The spawning thread went home: no daemon thread is left in any leaf.
    own = Path(f"/proc/{os.getpid()}/task")
    for task in own.iterdir():
        text = (task / "cgroup").read_text()
        assert "supervisord-qnx" not in text, (task.name, text)


def test_spawn_returns_with_the_worker_in_its_leaf_in_every_hierarchy(
    backend: Cgroup1Backend,
) -> None:
    """The shim moves itself through each hierarchy's ``tasks`` and says so by letting go
    of its stdin pipe: when ``spawn`` returns, every hierarchy lists the worker already
    (no polling by the caller), and the worker's stdin is /dev/null, as it always was."""
    make_tree(backend, ("tenants", {"flags": HIER}), ("tenants/web", {"memory_max": 64 * MiB}))
    r, w = os.pipe()
    argv = ["sh", "-c", "if cat; then echo read-eof; else echo cat-failed; fi; exec sleep 30"]
    try:
        proc = backend.spawn(request("tenants/web", "web-0", argv, stdout=w))
    finally:
        os.close(w)
    try:
        # Read at once, before anything else runs here: no wait_for.
        listed = {d: fs.read_procs(d) for _, d in backend._join_dirs("tenants/web", "web-0")}
        with os.fdopen(r, "rb") as f:
            line = f.readline().decode()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    # Every hierarchy but a cpuset-only one with no cpuset set (the daemon's is kept).
    assert len(listed) == len([h for h in backend._hier if h.controllers != {"cpuset"}])
    for d, pids in listed.items():
        # The shell itself, and maybe already the cat it started.
        assert proc.pid in pids, (d, pids)
    # cat read /dev/null to its end: stdin was neither the shim's pipe nor closed.
    assert line == "read-eof\n"


def test_spawn_works_with_descriptors_past_1024(backend: Cgroup1Backend) -> None:
    """A daemon with 1000 workers holds descriptors past FD_SETSIZE (1024): the spawn's
    wait for its shim to join must not be select()'s, which refuses them."""
    make_tree(backend, ("tenants", {"flags": HIER}), ("tenants/web", {}))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1300, hard), hard))
    fillers: list[int] = []
    proc = None
    try:
        while not fillers or fillers[-1] < 1100:
            fillers.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        proc = backend.spawn(request("tenants/web", "web-0", ["sleep", "30"]))
        assert backend.pids("tenants/web", "web-0") == [proc.pid]
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if proc is not None:
            proc.kill()
            proc.wait(timeout=30)


async def test_concurrent_spawns_from_worker_threads(backend: Cgroup1Backend) -> None:
    make_tree(backend, ("tenants", {"flags": HIER}), ("tenants/web", {"pids_max": 64}))
    procs: dict[str, subprocess.Popen[bytes]] = {}

    async def one(i: int) -> None:
        req = request("tenants/web", f"web-{i}", ["sleep", "30"])
        procs[f"web-{i}"] = await trio.to_thread.run_sync(backend.spawn, req)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, i)
    try:
        for leaf, proc in procs.items():
            # The default shim attaches itself just after Popen returns (before exec).
            cgroup_file = Path(f"/proc/{proc.pid}/cgroup")
            assert wait_for(partial(lambda f: "@" in f.read_text(), cgroup_file))
            mem = cgroup_lines(Path(f"/proc/{proc.pid}/cgroup").read_text())["memory"]
            assert mem.endswith(f"/tenants/web/@{leaf}")
            assert backend.pids("tenants/web", leaf) == [proc.pid]
        assert sorted(backend.pids("tenants/web")) == sorted(p.pid for p in procs.values())
    finally:
        backend.destroy("tenants/web")
        for p in procs.values():
            p.wait(timeout=30)
    assert all(p.returncode == -signal.SIGKILL for p in procs.values())


def test_attach_and_detach_running_process(backend: Cgroup1Backend) -> None:
    make_tree(backend, ("g", {"memory_max": 64 * MiB}))
    proc = subprocess.Popen(["sleep", "30"])
    try:
        backend.attach("g", proc.pid)
        assert backend.pids("g") == [proc.pid]
        backend.detach(proc.pid)
        assert backend.pids("g") == []
        assert alive(proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------- memory

HOG = textwrap.dedent(
    """
    hoard = []
    for _ in range({mib}):
        hoard.append(bytearray(1 << 20))  # zero-filled: every page touched
    print("survived", flush=True)
    """
)


async def test_oom_kill_is_attributed_to_the_leaf_and_spares_the_sibling(
    backend: Cgroup1Backend,
) -> None:
    tree = make_tree(backend, ("tenants", {"flags": HIER}), ("tenants/a", {"memory_max": 48 * MiB}))
    events: list[BackendEvent] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.watch, tree, events.append)
        sibling = await trio.to_thread.run_sync(
            backend.spawn, request("tenants/a", "a-1", ["sleep", "60"])
        )
        hog = await trio.to_thread.run_sync(
            backend.spawn,
            request("tenants/a", "a-0", [sys.executable, "-c", HOG.format(mib=4 * 48)]),
        )
        rc = await trio.to_thread.run_sync(hog.wait)
        assert rc == -signal.SIGKILL
        assert backend.leaf_exit_reason("tenants/a", "a-0") == "oom-killed"
        with trio.fail_after(5):
            while not any(e.kind is EventKind.OOM_KILL for e in events):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    oom = [e for e in events if e.kind is EventKind.OOM_KILL]
    assert [(e.partition, e.leaf) for e in oom] == [("tenants/a", "a-0")]
    # The sibling worker is untouched: same pid, still running, no reason recorded.
    assert sibling.poll() is None and alive(sibling.pid)
    assert backend.pids("tenants/a", "a-1") == [sibling.pid]
    assert backend.leaf_exit_reason("tenants/a", "a-1") is None
    assert backend.stats("tenants/a").oom_kills == 1
    # A restart in the same leaf starts from a fresh baseline.
    assert backend.leaf_exit_reason("tenants/a", "a-0") is None
    backend.destroy("tenants/a")
    sibling.wait(timeout=30)


async def test_memory_pressure_event_when_usage_crosses_max_minus_reserved(
    backend: Cgroup1Backend,
) -> None:
    tree = make_tree(
        backend, ("p", {"memory_max": 128 * MiB, "memory_reserved": 64 * MiB})
    )  # threshold 64 MiB
    soft = backend._mem("p") / "memory.soft_limit_in_bytes"
    assert int(soft.read_text()) == 64 * MiB
    events: list[BackendEvent] = []
    code = "import time; x = b'x' * (80 << 20); print('ok', flush=True); time.sleep(30)"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.watch, tree, events.append)
        await trio.sleep(0)
        proc = await trio.to_thread.run_sync(
            backend.spawn, request("p", "p-0", [sys.executable, "-c", code])
        )
        with trio.fail_after(10):
            while not any(e.kind is EventKind.MEMORY_PRESSURE for e in events):
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    (ev,) = [e for e in events if e.kind is EventKind.MEMORY_PRESSURE]
    assert ev.partition == "p" and ev.detail["threshold"] == 64 * MiB
    assert isinstance(ev.detail["usage"], int) and ev.detail["usage"] >= 64 * MiB
    assert backend.stats("p").memory_pressure_events == 1
    assert proc.poll() is None  # pressure is a warning, not a kill
    backend.destroy("p")
    proc.wait(timeout=30)


def test_pressure_thresholds_are_armed_before_a_partitions_first_worker(
    backend: Cgroup1Backend,
) -> None:
    """Thresholds are armed in the background (each costs the kernel an RCU grace
    period); a partition's first leaf, i.e. anything that runs in it, waits for its own."""
    names = [f"p{i}" for i in range(12)]
    limits: dict[str, object] = {"memory_max": 128 * MiB, "memory_reserved": 64 * MiB}
    make_tree(backend, *((n, limits) for n in names))
    for n in reversed(names):  # the last created first: the likeliest to be still arming
        backend.ensure_leaf(n, f"{n}-0")
        watched = backend._notifier.keys()  # a list of the keys with a live eventfd
        assert ("pressure", n, None) in watched, n
    for n in names:
        backend.destroy(n)


def test_an_armed_threshold_keeps_nothing_for_a_partition_never_started(
    backend: Cgroup1Backend,
) -> None:
    """Once armed, a threshold's background job is forgotten, not kept (a future with its
    lock and condition, per partition) until a first worker that may never come."""
    names = [f"q{i}" for i in range(12)]
    limits: dict[str, object] = {"memory_max": 128 * MiB, "memory_reserved": 64 * MiB}
    make_tree(backend, *((n, limits) for n in names))
    deadline = time.monotonic() + 30
    while True:
        watched = backend._notifier.keys()  # a list of the keys with a live eventfd
        if not backend._arming and all(("pressure", n, None) in watched for n in names):
            break
        assert time.monotonic() < deadline, (backend._arming, watched)
        time.sleep(0.02)
    for n in names:
        backend.ensure_leaf(n, f"{n}-0")  # armed: nothing to wait for, nothing raised
        backend.destroy(n)


def _arming_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("cgroup1-pressure")]


def test_the_arming_threads_go_once_a_burst_is_armed_and_come_back_for_the_next(
    backend: Cgroup1Backend,
) -> None:
    """The pool that arms thresholds is made for a burst (a start-up, a reload) and its
    threads end with it: kept, they were a stack and a malloc arena each for the
    daemon's life (issue 14: daemon RSS). A partition added later is still armed."""
    limits: dict[str, object] = {"memory_max": 128 * MiB, "memory_reserved": 64 * MiB}

    def armed(names: list[str]) -> bool:
        watched = backend._notifier.keys()  # a list of the keys with a live eventfd
        return all(("pressure", n, None) in watched for n in names)

    for burst in (["r0", "r1", "r2", "r3", "r4", "r5"], ["r6"]):
        make_tree(backend, *((n, limits) for n in burst))
        deadline = time.monotonic() + 30
        while not (armed(burst) and not _arming_threads()):
            assert time.monotonic() < deadline, (burst, _arming_threads())
            time.sleep(0.02)
        for n in burst:
            backend.ensure_leaf(n, f"{n}-0")
    for n in ["r0", "r1", "r2", "r3", "r4", "r5", "r6"]:
        backend.destroy(n)


def test_limits_are_written_to_the_kernel_files(backend: Cgroup1Backend) -> None:
    make_tree(
        backend,
        ("g", {"flags": HIER, "memory_max": 256 * MiB, "cpu_budget": 50, "cpu_max": 60}),
        (
            "g/t",
            {
                "memory_max": 64 * MiB,
                "memory_reserved": 8 * MiB,
                "cpu_budget": 10,
                "cpu_max": 20,
                "pids_max": 16,
            },
        ),
    )
    mem = backend._mem("g/t")
    assert int((mem / "memory.limit_in_bytes").read_text()) == 64 * MiB
    assert int((mem / "memory.soft_limit_in_bytes").read_text()) == 56 * MiB
    assert int((mem / "memory.use_hierarchy").read_text()) == 1
    if (mem / "memory.memsw.limit_in_bytes").exists():
        assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == 64 * MiB
    ncpu = os.cpu_count() or 1
    cpu = backend._ctrl("cpu", "g/t")
    if cpu is not None:
        assert int((cpu / "cpu.shares").read_text()) == 10 * 1024
        assert int((cpu / "cpu.cfs_period_us").read_text()) == 100_000
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == round(0.2 * ncpu * 100_000)
    pids = backend._ctrl("pids", "g/t")
    if pids is not None:
        assert (pids / "pids.max").read_text().strip() == "16"
    levels = backend.enforcement()
    assert levels[Control.MEMORY_MAX] is Enforcement.KERNEL
    assert levels[Control.MEMORY_MIN] is Enforcement.NONE
    # Namespaces come from unshare, not from the cgroup: where this machine has them.
    assert levels[Control.CONTAINER] is (
        Enforcement.NONE if container.unavailable() else Enforcement.KERNEL
    )


def test_stats_report_kernel_figures(backend: Cgroup1Backend) -> None:
    make_tree(backend, ("s", {"memory_max": 128 * MiB, "pids_max": 10}))
    code = "import time; x = b'x' * (20 << 20); print('ok', flush=True); time.sleep(30)"
    r, w = os.pipe()
    proc = backend.spawn(request("s", "s-0", [sys.executable, "-c", code], stdout=w))
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            assert f.readline() == b"ok\n"
        st = backend.stats("s")
        assert st.memory_current is not None and st.memory_current >= 20 * MiB
        assert st.memory_peak is not None and st.memory_peak >= st.memory_current
        assert st.memory_limit == 128 * MiB
        assert st.oom_kills == 0
        assert st.pids == [proc.pid]
        assert st.pids_current == 1
        assert st.cpu_usage_ns is not None and st.cpu_usage_ns > 0
        assert st.cpu_throttled_ns == 0
    finally:
        backend.destroy("s")
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------- pids, cpu


def test_fork_bomb_stops_at_pids_max(backend: Cgroup1Backend) -> None:
    if "pids" not in backend._by_ctrl:
        pytest.skip("the v1 pids controller is not mounted")
    make_tree(backend, ("b", {"pids_max": 8}))
    bomb = "i=0; while [ $i -lt 64 ]; do sleep 30 & i=$((i+1)); done; wait"
    proc = backend.spawn(request("b", "b-0", ["/bin/sh", "-c", bomb]))
    pids_dir = backend._ctrl("pids", "b")
    assert pids_dir is not None
    peak = 0
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        peak = max(peak, int((pids_dir / "pids.current").read_text()))
        peak = max(peak, len(backend.pids("b")))
        time.sleep(0.01)
    try:
        assert 1 < peak <= 8
        # Kernels count the refusal at the forking cgroup, the limiting one, or both.
        refused = [
            fs.read_keyed(d / "pids.events").get("max", 0) for d in fs.subtree_dirs(pids_dir)
        ]
        if (pids_dir / "pids.events").exists():
            assert sum(refused) > 0, "no fork was refused: the bomb was not bounded"
    finally:
        backend.destroy("b")
        proc.wait(timeout=30)


def test_cpu_max_caps_a_spinner(backend: Cgroup1Backend) -> None:
    if "cpu" not in backend._by_ctrl or "cpuacct" not in backend._by_ctrl:
        pytest.skip("the v1 cpu/cpuacct controllers are not mounted")
    ncpu = os.cpu_count() or 1
    # cpu.max is percent of the whole machine; 20/ncpu % of it is 20 % of one core.
    make_tree(backend, ("c", {"cpu_max": 20 / ncpu}))
    cpu = backend._ctrl("cpu", "c")
    acct = backend._ctrl("cpuacct", "c")
    assert cpu is not None and acct is not None
    assert int((cpu / "cpu.cfs_quota_us").read_text()) == 20_000
    proc = backend.spawn(request("c", "c-0", [sys.executable, "-c", "while True: pass"]))
    try:
        time.sleep(0.2)  # interpreter start-up
        u0, t0 = int((acct / "cpuacct.usage").read_text()), time.monotonic()
        time.sleep(2.0)
        u1, t1 = int((acct / "cpuacct.usage").read_text()), time.monotonic()
        share = (u1 - u0) / 1e9 / (t1 - t0)
        assert 0 < share <= 0.25, f"spinner used {share:.0%} of one core"
        assert (backend.stats("c").cpu_throttled_ns or 0) > 0
    finally:
        backend.destroy("c")
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------- admission


def test_a_name_cgroupfs_cannot_take_is_refused_before_any_cgroup_exists(
    backend: Cgroup1Backend, tmp_path: Path
) -> None:
    # A tenant file the config model accepts but this backend cannot map ("memory.big"
    # would sit among the memory controller's files), beside a valid one. The daemon's
    # gate, as its CLI runs it (load, then admit with the backend's own checks), refuses
    # it with the located problem, and nothing it ran created a cgroup.
    tenants = tmp_path / "tenants.d"
    tenants.mkdir()
    for name in ("memory.big", "fits"):
        (tenants / f"{name}.toml").write_text(
            'memory = { max = "32MiB" }\n[[worker]]\nname = "w"\ncommand = ["true"]\n'
        )
    daemon_file = tmp_path / "d.toml"
    daemon_file.write_text(
        '[daemon]\nbackend = "cgroup1"\n'
        '[[partition]]\nname = "tenants"\nflags = ["hierarchical"]\nmemory = { max = "64MiB" }\n'
    )
    config = load(daemon_file)
    with pytest.raises(ConfigError) as info:
        admit(config, backend)
    assert [str(p) for p in info.value.problems] == [
        f"{daemon_file}: daemon.backend=cgroup1: partition 'tenants/memory.big': the name "
        "'memory.big' clashes with cgroup control files; rename the partition"
    ]
    assert not any(r.exists() for r in backend.roots)
    # The same check sees directories when there are some: the valid part of the tree,
    # created, shows up under the roots (and the fixture removes it).
    backend.create(Partition("tenants", flags=HIER, memory_max=64 * MiB))
    assert all(r.exists() for r in backend.roots)


# ---------------------------------------------------------------------------- cleanup


def test_destroy_leaves_no_directory_behind(backend: Cgroup1Backend) -> None:
    tree = make_tree(
        backend,
        ("tenants", {"flags": HIER, "memory_max": 256 * MiB}),
        ("tenants/a", {"memory_max": 64 * MiB, "pids_max": 20}),
        ("tenants/b", {"memory_max": 64 * MiB}),
    )
    procs = [
        backend.spawn(request(p, f"{p[-1]}-{i}", ["sleep", "30"]))
        for p in ("tenants/a", "tenants/b")
        for i in range(2)
    ]
    for node in tree.deepest_first():
        backend.destroy(node.path)
    for p in procs:
        assert p.wait(timeout=5) == -signal.SIGKILL
    assert [d for d in tree_dirs(backend.roots) if d not in backend.roots] == []
    backend.close()
    assert not any(r.exists() for r in backend.roots)


def test_destroy_all_kills_and_removes_everything_even_a_process_one_hierarchy_lost(
    backend: Cgroup1Backend,
) -> None:
    """The shutdown's removal lists one hierarchy and reads its ``cgroup.procs`` only
    (every worker is in its leaf in all of them); a process that is in its leaf in every
    hierarchy but one (moved out of it by someone else) is still found and killed, and
    every directory still goes, whichever hierarchy that one is."""
    roots = backend.roots
    tree = make_tree(
        backend,
        ("tenants", {"flags": HIER, "memory_max": 256 * MiB}),
        ("tenants/a", {"memory_max": 64 * MiB, "pids_max": 20}),
        ("tenants/b", {"memory_max": 64 * MiB}),
    )
    kept = backend.spawn(request("tenants/a", "a-0", ["sleep", "30"]))
    procs = [kept]
    # One process per hierarchy, each moved out of its leaf there into that hierarchy's
    # cgroup above our root.
    for i, (h, leaf) in enumerate(backend._join_dirs("tenants/b", "b-0")):
        proc = backend.spawn(request("tenants/b", f"b-{i}", ["sleep", "30"]))
        # Its leaf there, or whatever it joined in that hierarchy instead.
        leaf = backend._join_dirs("tenants/b", f"b-{i}")[i][1]
        root = h.root
        (root.parent / "cgroup.procs").write_text(str(proc.pid))
        assert str(proc.pid) not in (leaf / "cgroup.procs").read_text().split()
        procs.append(proc)
    assert backend.destroy_all([node.path for node in tree]) == []
    for p in procs:
        assert p.wait(timeout=5) == -signal.SIGKILL
    assert [d for d in tree_dirs(roots) if d not in roots] == []
    backend.close()
    assert not any(r.exists() for r in roots)


def test_release_leaf_kills_stragglers_and_removes_the_leaf(backend: Cgroup1Backend) -> None:
    make_tree(backend, ("r", {}))
    # The worker's main process exits at once, leaving a grandchild behind in the leaf.
    proc = backend.spawn(request("r", "r-0", ["/bin/sh", "-c", "sleep 30 & exit 0"]))
    assert proc.wait(timeout=30) == 0
    assert wait_for(lambda: len(backend.pids("r", "r-0")) == 1)
    (straggler,) = backend.pids("r", "r-0")
    backend.release_leaf("r", "r-0")
    assert not (backend._mem("r") / "@r-0").exists()
    assert wait_for(lambda: not alive(straggler))


DEAD_DAEMON = textwrap.dedent(
    """
    import os, signal, sys
    from supervisord_qnx.partition.backend import SpawnRequest
    from supervisord_qnx.partition.cgroup_v1 import Cgroup1Backend
    from supervisord_qnx.partition.tree import Partition
    b = Cgroup1Backend(instance=sys.argv[1])
    b.create(Partition("tenants", flags=frozenset({"hierarchical"})))
    b.create(Partition("tenants/x", memory_max=64 << 20))
    null = os.open(os.devnull, os.O_WRONLY)
    pids = [
        b.spawn(SpawnRequest("tenants/x", f"x-{i}", ["sleep", "60"], None, dict(os.environ),
                             null, null)).pid
        for i in range(3)
    ]
    print(" ".join(map(str, pids)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # die without destroy: a crashed daemon
    """
)


def test_reap_leftovers_of_a_killed_daemon(backend: Cgroup1Backend, instance: str) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", DEAD_DAEMON, instance],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert dead.returncode == -signal.SIGKILL, dead.stderr.decode()
    orphans = [int(x) for x in dead.stdout.split()]
    assert len(orphans) == 3 and all(alive(p) for p in orphans)
    assert wait_for(lambda: all("@x-" in Path(f"/proc/{p}/cgroup").read_text() for p in orphans))
    reaped = backend.reap_leftovers()
    assert {"tenants", "tenants/x", "tenants/x/@x-0"} <= set(reaped)
    assert wait_for(lambda: not any(alive(p) for p in orphans))
    assert [d for d in tree_dirs(backend.roots) if d not in backend.roots] == []


def test_reap_leftovers_after_the_backend_object_is_dropped(
    backend: Cgroup1Backend, instance: str
) -> None:
    old = Cgroup1Backend(instance=instance)
    old.create(Partition("q", memory_max=32 * MiB))
    proc = old.spawn(request("q", "q-0", ["sleep", "60"]))
    assert wait_for(lambda: backend.pids("q") == [proc.pid])
    del old  # no destroy, no close
    assert set(backend.reap_leftovers()) == {"q", "q/@q-0"}
    assert proc.wait(timeout=5) == -signal.SIGKILL


def test_reap_never_touches_other_roots(backend: Cgroup1Backend) -> None:
    other = Cgroup1Backend(instance=unique_instance("other"))
    try:
        other.create(Partition("keep", memory_max=32 * MiB))
        proc = other.spawn(request("keep", "k-0", ["sleep", "30"]))
        assert wait_for(lambda: other.pids("keep") == [proc.pid])
        backend.reap_leftovers()
        assert proc.poll() is None and other.pids("keep") == [proc.pid]
    finally:
        other.destroy("keep")
        other.close()
        proc.wait(timeout=30)


def test_root_holding_the_daemon_is_refused() -> None:
    require_cgroup1()
    with pytest.raises(BackendUnavailable, match="own cgroup"):
        Cgroup1Backend("/")


# ---------------------------------------------------------------------------- detection


def test_auto_picks_cgroup1_here_and_forced_cgroup2_says_why() -> None:
    require_cgroup1()
    from supervisord_qnx.partition.cgroup_v2 import Cgroup2Backend
    from supervisord_qnx.partition.detect import choose_backend

    why_v2 = Cgroup2Backend.probe()
    chosen = choose_backend("auto", cgroup_root=None, instance=unique_instance("auto"))
    try:
        assert chosen.name == ("cgroup2" if why_v2 is None else "cgroup1")
    finally:
        chosen.close()
    if why_v2 is not None:
        with pytest.raises(BackendUnavailable, match="memory controller") as info:
            choose_backend("cgroup2", cgroup_root=None)
        print(f"forced cgroup2 refused: {info.value}")
    forced = choose_backend("cgroup1", cgroup_root="custom-root", instance="x")
    assert isinstance(forced, Cgroup1Backend)
    assert forced.roots[0].name == "custom-root.x"
    forced.close()


# ------------------------------------------------------------- fewer directories (issue 14)


def _allowed(text: str) -> str:
    line = next(ln for ln in text.splitlines() if ln.startswith("Cpus_allowed_list:"))
    return line.split(":", 1)[1].strip()


def test_a_worker_has_leaves_only_in_memory_and_cpu_and_no_cpuset_without_cpus(
    backend: Cgroup1Backend,
) -> None:
    """Each directory costs a serialised rmdir at shutdown (issue 14): a worker gets a
    leaf where one means something, and a partition gets a cpuset directory only where a
    cpuset is in force. The limits stay where they were: pids.max on the partition
    holds a worker that sits in the partition's own pids directory."""
    make_tree(backend, ("tenants", {"flags": HIER}), ("tenants/web", {"pids_max": 3}))
    script = "cat /proc/self/cgroup; for i in 1 2 3 4 5; do sleep 30 & done; wait"
    r, w = os.pipe()
    try:
        proc = backend.spawn(request("tenants/web", "web-0", ["sh", "-c", script], stdout=w))
    finally:
        os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            lines = [f.readline().decode()]
            while not lines[-1].startswith("0::"):  # /proc/self/cgroup's last line
                lines.append(f.readline().decode())
        seen = cgroup_lines("".join(lines))
        made = {d for root in backend.roots for d in fs.subtree_dirs(root)}
        by_ctrl = backend._by_ctrl
        for c in ("memory", "cpu"):
            if c in by_ctrl:
                assert by_ctrl[c].root / "tenants/web/@web-0" in made
        for c in ("cpuacct", "pids"):
            if c in by_ctrl:
                assert by_ctrl[c].root / "tenants/web" in made
                assert by_ctrl[c].root / "tenants/web/@web-0" not in made
        if "cpuset" in by_ctrl:
            assert not (by_ctrl["cpuset"].root / "tenants").exists()
            own = cgroup_lines(Path("/proc/self/cgroup").read_text())["cpuset"]
            assert seen["cpuset"] == own, seen
        if "pids" in by_ctrl:
            # The shell and two of its sleeps: a third fork was refused at pids.max.
            events = by_ctrl["pids"].root / "tenants/web/pids.events"
            assert wait_for(lambda: fs.read_keyed(events).get("max", 0) >= 1)
            assert int((events.parent / "pids.current").read_text()) <= 3
    finally:
        backend.destroy("tenants/web")
        proc.wait(timeout=30)
    backend.destroy("tenants")
    assert [d for d in tree_dirs(backend.roots) if d not in backend.roots] == []


def test_a_cpuset_is_enforced_below_where_it_is_set_and_nowhere_else(
    backend: Cgroup1Backend,
) -> None:
    if "cpuset" not in backend._by_ctrl or (os.cpu_count() or 1) < 2:
        pytest.skip("needs the v1 cpuset controller and a second CPU")
    cpuset = backend._by_ctrl["cpuset"].root
    make_tree(
        backend,
        ("tenants", {"flags": HIER}),
        ("tenants/pinned", {"cpuset": frozenset({1}), "flags": HIER}),
        ("tenants/pinned/inner", {}),
        ("tenants/free", {}),
    )
    assert (cpuset / "tenants/pinned/cpuset.cpus").read_text().strip() == "1"
    # A child of a cpuset partition has its own directory, with its parent's CPUs.
    assert (cpuset / "tenants/pinned/inner/cpuset.cpus").read_text().strip() == "1"
    assert not (cpuset / "tenants/free").exists()
    status = ["cat", "/proc/self/status", "/proc/self/cgroup"]
    inner = run_capture(backend, "tenants/pinned/inner", "in-0", status)
    assert _allowed(inner) == "1"
    own = cgroup_lines("\n".join(ln for ln in inner.splitlines() if ln[:1].isdigit()))
    assert own["cpuset"].endswith("/tenants/pinned/inner"), own
    free = run_capture(backend, "tenants/free", "f-0", status)
    assert _allowed(free) == _allowed(Path("/proc/self/status").read_text())
    # A partition that sets a cpuset under parents made without one (a reload added it
    # to a live parent): the missing ancestors are made on the way, and it is enforced.
    backend.create(Partition("tenants/free/late", cpuset=frozenset({1})))
    assert (cpuset / "tenants/free/late/cpuset.cpus").read_text().strip() == "1"
    assert _allowed(run_capture(backend, "tenants/free/late", "l-0", status)) == "1"
    assert backend.destroy_all(["tenants"]) == []
    assert [d for d in tree_dirs(backend.roots) if d not in backend.roots] == []


@pytest.mark.parametrize("where", ["every hierarchy, holding the worker", "cpuset, empty"])
def test_destroy_all_also_removes_an_older_layouts_directories(
    backend: Cgroup1Backend, where: str
) -> None:
    """A daemon before this one made a leaf in every hierarchy and a cpuset directory for
    every partition; what a restarted daemon adopted from it still goes at shutdown, with
    the process an older leaf holds, and also where nothing else would have failed (the
    empty cpuset directories this layout never makes nor looks at otherwise)."""
    make_tree(backend, ("tenants", {"flags": HIER}), ("tenants/old", {"memory_max": 64 * MiB}))
    proc = backend.spawn(request("tenants/old", "o-0", ["sleep", "30"]))
    cpuset_only = where.startswith("cpuset")
    if cpuset_only and "cpuset" not in backend._by_ctrl:
        pytest.skip("the v1 cpuset controller is not mounted")
    extra = []
    for root in backend.roots:
        if cpuset_only and root != backend._by_ctrl["cpuset"].root:
            continue
        for rel in ("tenants", "tenants/old", "tenants/old/@o-0"):
            if not (root / rel).exists():
                os.mkdir(root / rel)
                extra.append(root / rel)
                if "cpuset" in str(root.parent):
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        (root / rel / f).write_text((root / rel).parent.joinpath(f).read_text())
    assert extra  # the layout does leave some out
    if not cpuset_only:
        # The worker in its older leaf wherever that is a directory the bookkeeping lacks.
        for d in extra:
            if d.name == "@o-0":
                (d / "cgroup.procs").write_text(str(proc.pid))
    assert backend.destroy_all(["tenants", "tenants/old"]) == []
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert [d for d in tree_dirs(backend.roots) if d not in backend.roots] == []


def test_reaping_around_a_kept_worker_spares_it_where_it_has_no_leaf(
    backend: Cgroup1Backend, instance: str
) -> None:
    """A restarted daemon keeps a live worker (adoption) and reaps the rest: the kept
    worker also sits in directories that are not its leaf (its partition's, in pids and
    cpuacct), and must not be killed as a stray found there."""
    old = Cgroup1Backend(instance=instance)
    old.create(Partition("t", memory_max=32 * MiB))
    old.create(Partition("u"))
    kept = old.spawn(request("t", "t-0", ["sleep", "60"]))
    stray = old.spawn(request("u", "u-0", ["sleep", "60"]))
    del old  # no destroy, no close: a daemon that went away
    try:
        reaped = backend.reap_leftovers_keeping({("t", "t-0")})
        assert stray.wait(timeout=5) == -signal.SIGKILL
        assert "u" in reaped
        time.sleep(0.2)
        assert kept.poll() is None
        assert backend.pids("t", "t-0") == [kept.pid]
    finally:
        kept.kill()
        kept.wait(timeout=30)
    assert backend.reap_leftovers()
    assert [d for d in tree_dirs(backend.roots) if d not in backend.roots] == []
