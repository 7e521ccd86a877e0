"""The cgroup2 backend at file level: which value goes into which file, in which order.

A temporary directory laid out like cgroupfs stands in for the kernel
(``FakeCgroup2Backend``): a ``mkdir`` grows the control files of the controllers its
parent enabled in ``cgroup.subtree_control``, so a write to a controller that was not
enabled top-down, before the child existed, fails as it would on the kernel. That is
all the fake models. It has no processes: its ``cgroup.procs`` is a plain file, so these
tests start none and its teardown signals nothing (``_kill`` fails the test if a pid ever
appears there). Its ``subtree_control`` takes the backend's one ``+a +b +c`` write as it
stands, and its ``memory.events`` are counters the tests write by hand, read by the
sampling fallback (a regular file cannot be epolled).

What the kernel does is proven on the kernel: moves, exits, ``cgroup.kill``, ``rmdir``
``EBUSY``, ``subtree_control`` deltas, the no-internal-processes rule and ``POLLPRI`` in
``test_cgroup2_core.py`` (on this host's cgroup2 mount, and again in the VM); memory,
cpu and pids enforcement, OOM and pressure events through epoll, and the daemon end to end
in ``test_cgroup2_kernel.py`` and ``test_daemon_cgroup2.py`` (``make test-cgroup2``: a VM
booting Debian's kernel, pure cgroup v2).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from supervisord_qnx.partition import cgroupfs as fs
from supervisord_qnx.partition import container
from supervisord_qnx.partition.backend import (
    BackendEvent,
    BackendUnavailable,
    Control,
    Enforcement,
    EventKind,
)
from supervisord_qnx.partition.cgroup_v2 import Cgroup2Backend, cpu_max_for, weight_for
from supervisord_qnx.partition.tree import Partition, PartitionTree
from tests.cgroup_helpers import make_tree, tree_dirs
from tests.cgroup_helpers import spawn_request as request

MiB = 1 << 20
HIER = frozenset({"hierarchical"})
EVENTS0 = "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"
CONTROLLER_FILES = {
    "memory": {
        "memory.min": "0",
        "memory.low": "0",
        "memory.high": "max",
        "memory.max": "max",
        "memory.swap.max": "max",
        "memory.oom.group": "0",
        "memory.events": EVENTS0,
        "memory.events.local": EVENTS0,
        "memory.current": "0",
        "memory.peak": "0",
    },
    "cpu": {
        "cpu.weight": "100",
        "cpu.max": "max 100000",
        "cpu.stat": "usage_usec 0\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
    },
    "pids": {"pids.max": "max", "pids.current": "0"},
}


def _tokens(path: Path) -> list[str]:
    return [t.lstrip("+") for t in path.read_text().split()]


class FakeCgroup2Backend(Cgroup2Backend):
    """The real backend over a tmpdir; only the kernel's own reactions are emulated."""

    def _mkdir(self, path: Path, partition: str) -> bool:
        made = super()._mkdir(path, partition)
        if made:
            enabled = _tokens(path.parent / "cgroup.subtree_control")
            (path / "cgroup.controllers").write_text(" ".join(enabled))
            (path / "cgroup.subtree_control").write_text("")
            (path / "cgroup.procs").write_text("")
            for controller in enabled:
                for name, value in CONTROLLER_FILES.get(controller, {}).items():
                    (path / name).write_text(value)
        return made

    def _rmdir(self, path: Path, partition: str) -> None:
        for f in path.iterdir():
            assert f.is_file(), f"rmdir of {path} while it has child cgroup {f}"
            f.unlink()
        super()._rmdir(path, partition)

    def _kill(self, top: Path, partition: str) -> None:  # noqa: ARG002 - the override's signature
        # The kernel would kill what cgroup.procs lists. Here it is a plain file and these
        # tests start no process, so a pid in it could only be a stale or foreign one:
        # never signal it, fail instead.
        listed = fs.subtree_procs(top)
        assert listed == [], f"file-level test left pids {listed} in {top}; not signalling"


@pytest.fixture
def mount(tmp_path: Path) -> Path:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc")
    (tmp_path / "cgroup.subtree_control").write_text("")
    (tmp_path / "cgroup.procs").write_text("")
    return tmp_path


@pytest.fixture
def backend(mount: Path) -> Iterator[FakeCgroup2Backend]:
    b = FakeCgroup2Backend(
        instance="files", mount=mount, own_cgroup="/", ncpu=2, sample_interval=0.02
    )
    try:
        yield b
    finally:
        try:
            b.reap_leftovers()
        finally:
            b.close()


TENANTS = {"flags": HIER, "memory_min": 8 * MiB, "cpu_budget": 50}
WEB = {
    "memory_min": 4 * MiB,
    "memory_max": 16 * MiB,
    "memory_reserved": 1 * MiB,
    "cpu_budget": 10,
    "cpu_max": 20,
    "pids_max": 32,
}


def test_files_get_the_mapped_values_and_controllers_are_enabled_top_down(
    backend: FakeCgroup2Backend, mount: Path
) -> None:
    make_tree(
        backend,
        (
            "tenants",
            {
                "flags": HIER,
                "memory_min": 8 * MiB,
                "memory_max": 256 * MiB,
                "cpu_budget": 50,
                "cpu_max": 80,
            },
        ),
        ("tenants/web", WEB),
    )
    root = backend.root
    assert root == mount / "supervisord-qnx.files"
    for d in (mount, root, root / "tenants", root / "tenants/web"):
        assert sorted(_tokens(d / "cgroup.subtree_control")) == ["cpu", "memory", "pids"], d
    web = root / "tenants/web"
    expected = {
        "memory.min": str(4 * MiB),
        "memory.high": str(15 * MiB),  # max - reserved
        "memory.max": str(16 * MiB),
        "memory.swap.max": "0",  # max caps RAM and swap
        "cpu.weight": "1000",  # 10 % x 100
        "cpu.max": "40000 100000",  # 20 % of 2 CPUs = 0.4 CPU
        "pids.max": "32",
    }
    assert {name: (web / name).read_text() for name in expected} == expected
    tenants = root / "tenants"
    assert (tenants / "memory.max").read_text() == str(256 * MiB)
    assert (tenants / "memory.min").read_text() == str(8 * MiB)
    assert (tenants / "memory.high").read_text() == str(256 * MiB)  # no reserve: high = max
    assert (tenants / "cpu.weight").read_text() == "5000"
    assert (tenants / "cpu.max").read_text() == "160000 100000"
    assert (tenants / "pids.max").read_text() == "max"  # untouched
    # Partitions never hold processes (no-internal-processes rule).
    assert all((d / "cgroup.procs").read_text() == "" for d in (root, tenants, web))
    assert backend.describe(PartitionTree()) == {}


def test_mapping_functions() -> None:
    assert weight_for(None) is None
    assert weight_for(1) == 100  # the kernel default: an unbudgeted partition is a 1 % one
    assert weight_for(100) == 10_000
    assert weight_for(0.001) == 1
    assert cpu_max_for(100, 4) == "400000 100000"  # the whole 4-CPU machine
    assert cpu_max_for(None, 4) is None


def test_attach_plan_prepares_the_leaf_and_names_its_procs_file(
    backend: FakeCgroup2Backend,
) -> None:
    # What the wasm fork server's worker writes its own pid into (docs/wasm.md, 7.).
    make_tree(backend, ("tenants", TENANTS), ("tenants/web", WEB))
    plan = backend.attach_plan(request("tenants/web", "web-0", ["unused"]))
    leaf = backend.root / "tenants/web/@web-0"
    assert plan.procs == (str(leaf / "cgroup.procs"),)
    assert plan.rlimits == () and dict(plan.env) == {}
    assert (leaf / "memory.oom.group").read_text() == "1"


async def test_oom_and_pressure_counters_become_events_and_reasons(
    backend: FakeCgroup2Backend,
) -> None:
    tree = make_tree(backend, ("tenants", TENANTS), ("tenants/web", WEB))
    backend.attach_plan(request("tenants/web", "web-0", ["unused"]))  # the leaf, no process
    web = backend.root / "tenants/web"
    events: list[BackendEvent] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.watch, tree, events.append)
        await trio.sleep(0.05)
        assert events == []
        (web / "@web-0/memory.events").write_text(EVENTS0.replace("oom_kill 0", "oom_kill 1"))
        (web / "memory.events").write_text(EVENTS0.replace("high 0", "high 7"))
        with trio.fail_after(5):
            while len(events) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    kinds = {(e.kind, e.partition, e.leaf) for e in events}
    assert kinds == {
        (EventKind.OOM_KILL, "tenants/web", "web-0"),
        (EventKind.MEMORY_PRESSURE, "tenants/web", None),
    }
    assert backend.leaf_exit_reason("tenants/web", "web-0") == "oom-killed"
    assert backend.leaf_exit_reason("tenants/web", "web-0") is None  # baseline moved on
    assert backend.stats("tenants/web").memory_pressure_events == 1


def test_stats_parse_the_v2_files(backend: FakeCgroup2Backend) -> None:
    make_tree(backend, ("s", {"memory_max": 64 * MiB}))
    d = backend.root / "s"
    (d / "memory.current").write_text("1048576\n")
    (d / "memory.peak").write_text("2097152\n")
    (d / "cpu.stat").write_text("usage_usec 1500\nthrottled_usec 20\n")
    (d / "pids.current").write_text("3\n")
    (d / "memory.events").write_text(EVENTS0.replace("oom_kill 0", "oom_kill 2"))
    st = backend.stats("s")
    assert (st.memory_current, st.memory_peak, st.memory_limit) == (MiB, 2 * MiB, 64 * MiB)
    assert (st.cpu_usage_ns, st.cpu_throttled_ns) == (1_500_000, 20_000)
    assert (st.pids_current, st.oom_kills) == (3, 2)


def test_destroy_and_reap_remove_everything(backend: FakeCgroup2Backend, mount: Path) -> None:
    tree = make_tree(backend, ("tenants", {"flags": HIER}), ("tenants/a", {}), ("tenants/b", {}))
    for leaf in ("a-0", "b-0"):
        backend.attach_plan(request(f"tenants/{leaf[0]}", leaf, ["unused"]))
    backend.destroy("tenants/a")
    assert not (backend.root / "tenants/a").exists()
    # A new backend over the same root finds what the old one left.
    again = FakeCgroup2Backend(instance="files", mount=mount, own_cgroup="/", ncpu=2)
    assert set(again.reap_leftovers()) == {"tenants", "tenants/b", "tenants/b/@b-0"}
    assert [d for d in tree_dirs(again.roots) if d != again.root] == []
    again.close()
    assert not backend.root.exists()
    del tree


def test_backend_check_rejects_names_that_clash_with_control_files(
    backend: FakeCgroup2Backend,
) -> None:
    tree = PartitionTree()
    tree.add(Partition("memory.max"), "")
    tree.add(Partition("tasks"), "")
    tree.add(Partition("web.v2"), "")
    problems = backend.check(tree)
    assert len(problems) == 2 and "memory.max" in problems[0]


def test_enforcement_is_declared_honestly(backend: FakeCgroup2Backend) -> None:
    levels = backend.enforcement()
    assert levels[Control.MEMORY_MIN] is Enforcement.KERNEL
    assert levels[Control.MEMORY_RESERVED] is Enforcement.KERNEL
    # Namespaces come from unshare, not from the cgroup: where this machine has them.
    assert levels[Control.CONTAINER] is (
        Enforcement.NONE if container.unavailable() else Enforcement.KERNEL
    )
    assert set(levels) == set(Control)


def test_forcing_cgroup2_without_its_memory_controller_says_so() -> None:
    from supervisord_qnx.partition.detect import choose_backend

    why = Cgroup2Backend.probe()
    if why is None:
        pytest.skip("this machine has a usable cgroup2 memory controller")
    with pytest.raises(BackendUnavailable) as info:
        choose_backend("cgroup2", cgroup_root=None)
    print(f"forced cgroup2: {info.value}")
    assert str(info.value).startswith("cgroup2: ")
    if "memory controller" in why:  # this machine's case: hybrid layout, v1 owns memory
        assert "memory controller is missing" in str(info.value)
