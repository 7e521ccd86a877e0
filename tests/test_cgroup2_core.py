"""The cgroup2 core for real: the kernel's own cgroupfs, no memory controller needed.

This host mounts cgroup2 at ``/sys/fs/cgroup/unified`` beside the v1 hierarchies (a hybrid
layout: v1 owns memory, cpu and pids), so ``backend = "auto"`` never picks cgroup2 here.
The *core* of cgroup2 is nevertheless real and writable, and everything the backend does
that does not need a controller is proven against it: the backend is pointed at that mount
(``Cgroup2Backend(mount=...)``), creates its own unique root under this process's cgroup,
and every test reaps and removes it (``cleaned``). The same file runs again inside the
cgroup2 VM (``make test-cgroup2``), where the full controller set is present.

What is proven here, on the kernel's files:

* a spawned worker's first instruction already runs in its leaf, and ``attach`` *moves* a
  process (one cgroup per process; the old leaf no longer lists it);
* an exited task leaves ``cgroup.procs`` at exit, before it is reaped;
* an unknown pid is refused (``ESRCH``) and the error names the file;
* ``cgroup.kill`` takes a whole subtree, forks and ``setsid`` escapees included;
* ``cgroup.events`` raises ``POLLPRI`` on each ``populated`` change, through the backend's
  own epoll ``Notifier``;
* ``rmdir`` answers ``EBUSY`` while a cgroup is populated, and ``destroy`` kills first;
* ``cgroup.subtree_control`` takes ``+``/``-`` deltas, never a replacement;
* the no-internal-processes rule, both ways round.

Only processes this test started are ever signalled, and only by the kernel through
``cgroup.kill`` or by the backend inside the test's own unique root.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from supervisord_qnx.partition import cgroupfs as fs
from supervisord_qnx.partition.backend import BackendError, Control, Enforcement, SpawnRequest
from supervisord_qnx.partition.cgroup_v2 import Cgroup2Backend
from supervisord_qnx.partition.tree import Partition, PartitionTree
from tests.cgroup_helpers import (
    alive,
    cgroup2_core,
    cleaned,
    skip_v2,
    unique_instance,
    wait_for,
)

HIER = frozenset({"hierarchical"})
# Controllers a test may hand down to show subtree_control's delta semantics.
CONTROLLERS = ("hugetlb", "pids", "memory", "io", "cpu")
# Domain-only controllers: the no-internal-processes rule is about them. Threaded-capable
# ones (cpu, pids) may be enabled over a cgroup that has processes, because a thread
# subtree handles internal competition. hugetlb is the one this hybrid host offers.
DOMAIN_ONLY = ("hugetlb", "memory", "io")


@pytest.fixture
def core() -> Iterator[Cgroup2Backend]:
    mount, own = cgroup2_core()
    b = Cgroup2Backend(
        instance=unique_instance("core"), mount=mount, own_cgroup=own, sample_interval=0.05
    )
    with cleaned(b):
        yield b


def build(backend: Cgroup2Backend, *paths: str) -> PartitionTree:
    tree = PartitionTree()
    for path in paths:
        tree.add(Partition(path, flags=HIER), path.rpartition("/")[0])
    assert tree.admit() == []
    for node in tree:
        backend.create(node)
    return tree


def request(partition: str, leaf: str, argv: list[str], stdout: int | None = None) -> SpawnRequest:
    return SpawnRequest(
        partition,
        leaf,
        argv,
        None,
        dict(os.environ),
        subprocess.DEVNULL if stdout is None else stdout,
        2,
    )


def events(d: Path) -> dict[str, int]:
    return fs.read_keyed(d / "cgroup.events")


def tokens(path: Path) -> set[str]:
    return set(path.read_text().split())


def write_errno(path: Path, value: str) -> int:
    """The errno the kernel answers a write with (0: accepted)."""
    try:
        fs.write_text(path, value)
    except BackendError as exc:
        assert isinstance(exc.__cause__, OSError)
        return exc.__cause__.errno or 0
    return 0


# --------------------------------------------------------------------------- processes


def test_spawned_worker_starts_in_its_leaf_and_partitions_hold_no_process(
    core: Cgroup2Backend,
) -> None:
    build(core, "tenants", "tenants/web")
    r, w = os.pipe()
    proc = core.spawn(request("tenants/web", "web-0", ["cat", "/proc/self/cgroup"], w))
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    assert proc.wait(timeout=30) == 0
    unified = next(line for line in text.splitlines() if line.startswith("0::"))
    # ``cat`` is the worker itself: what it printed is where its first instruction ran.
    rel = core.root.relative_to(core.mount)
    assert unified == f"0::/{rel}/tenants/web/@web-0", text
    assert [fs.read_procs(core.root / p) for p in ("", "tenants", "tenants/web")] == [[], [], []]
    # Without a memory controller the backend says so instead of claiming the kernel.
    if "memory" not in tokens(core.own_dir / "cgroup.controllers"):
        assert core.enforcement()[Control.MEMORY_MAX] is Enforcement.NONE


def test_attach_moves_and_an_exited_task_leaves_before_it_is_reaped(core: Cgroup2Backend) -> None:
    build(core, "g")
    proc = core.spawn(request("g", "g-0", ["sleep", "300"]))
    try:
        leaf, attached = core.root / "g/@g-0", core.root / "g/@attached"
        assert wait_for(lambda: fs.read_procs(leaf) == [proc.pid])
        core.attach("g", proc.pid)
        # A move, not a copy: one process is in exactly one cgroup.
        assert fs.read_procs(attached) == [proc.pid]
        assert fs.read_procs(leaf) == []
        assert core.pids("g") == [proc.pid]
        proc.kill()
        # Wait for the exit but leave the zombie unreaped: the kernel unlinks a task from
        # its cgroup when it exits, so a dead, unreaped worker does not block rmdir.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        assert not alive(proc.pid)
        assert fs.read_procs(attached) == []
        assert events(attached)["populated"] == 0
    finally:
        proc.kill()
        proc.wait(timeout=30)
    core.destroy("g")
    assert not (core.root / "g").exists()


def test_an_unknown_pid_is_refused_with_the_file_named(core: Cgroup2Backend) -> None:
    build(core, "g")
    # pid_max itself is never a pid (pids run below it), so this cannot hit a real process.
    nobody = int(Path("/proc/sys/kernel/pid_max").read_text())
    with pytest.raises(BackendError) as info:
        core.attach("g", nobody)
    assert "ESRCH" in str(info.value) and "g/@attached/cgroup.procs" in str(info.value)
    assert fs.read_procs(core.root / "g/@attached") == []


# A worker that leaves descendants behind: a child in the background, a grandchild that
# calls setsid() (escaping the process group and session), and a fork loop.
SPREAD = (
    "sleep 300 & setsid sleep 300 & (while :; do sleep 300 & sleep 0.05; done) & echo ready; wait"
)


def test_cgroup_kill_takes_the_whole_subtree_forks_and_setsid_included(
    core: Cgroup2Backend,
) -> None:
    build(core, "k")
    r, w = os.pipe()
    proc = core.spawn(request("k", "k-0", ["/bin/sh", "-c", SPREAD], w))
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            assert f.readline() == b"ready\n"
        leaf = core.root / "k/@k-0"
        assert wait_for(lambda: len(fs.read_procs(leaf)) >= 5, timeout=30)
        members = fs.read_procs(leaf)
        # One write, no signals of ours: the kernel kills every member, including
        # whatever the fork loop adds meanwhile.
        fs.write_text(leaf / "cgroup.kill", "1")
        assert wait_for(lambda: events(leaf)["populated"] == 0, timeout=30)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert not [p for p in members if alive(p)]
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_kill_leaf_empties_a_leaf_and_returns_on_its_populated_event(
    core: Cgroup2Backend,
) -> None:
    # The supervisor's clean-up after a run: one call, and the leaf (forks and setsid
    # escapees included) is empty when it returns; the waiting is on cgroup.events.
    build(core, "kl")
    r, w = os.pipe()
    proc = core.spawn(request("kl", "kl-0", ["/bin/sh", "-c", SPREAD], w))
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            assert f.readline() == b"ready\n"
        leaf = core.root / "kl/@kl-0"
        assert wait_for(lambda: len(fs.read_procs(leaf)) >= 5, timeout=30)
        members = fs.read_procs(leaf)
        survivors = trio.run(core.kill_leaf, "kl", "kl-0")
        assert survivors == []
        assert events(leaf)["populated"] == 0 and fs.read_procs(leaf) == []
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert not [p for p in members if alive(p)]
        # An empty leaf, and one that is gone, answer at once.
        assert trio.run(core.kill_leaf, "kl", "kl-0") == []
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_cgroup_events_signals_populated_changes_through_the_notifier(
    core: Cgroup2Backend,
) -> None:
    build(core, "n")
    core.ensure_leaf("n", "n-0")
    leaf = core.root / "n/@n-0"
    notifier = fs.Notifier()
    key: fs.Key = ("populated", "n", "n-0")
    try:
        fd = os.open(leaf / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        os.pread(fd, 4096, 0)  # arm: POLLPRI reports changes after a read
        notifier.add(key, fd, eventfd=False)
        assert key not in notifier.polled  # kernfs: really in the epoll set, not sampled

        def fired() -> bool:
            ready, _, _ = select.select([notifier], [], [], 10)
            return bool(ready) and notifier.ready() == [key]

        assert notifier.ready() == []
        proc = core.spawn(request("n", "n-0", ["sleep", "300"]))
        try:
            assert fired()
            assert events(leaf)["populated"] == 1
            assert notifier.ready() == []  # ready() re-read the file: nothing pending
        finally:
            proc.kill()
            proc.wait(timeout=30)
        assert fired()
        assert events(leaf)["populated"] == 0
    finally:
        notifier.close()


def test_rmdir_is_busy_while_populated_and_destroy_kills_first(core: Cgroup2Backend) -> None:
    build(core, "r")
    proc = core.spawn(request("r", "r-0", ["sleep", "300"]))
    try:
        leaf = core.root / "r/@r-0"
        assert wait_for(lambda: fs.read_procs(leaf) == [proc.pid])
        with pytest.raises(OSError) as info:
            os.rmdir(leaf)
        assert info.value.errno == errno.EBUSY
        with pytest.raises(BackendError, match="EBUSY"):
            fs.rmdir_retry(leaf, "r", timeout=0.2)
        # A cgroup with a child cgroup is busy too, populated or not.
        with pytest.raises(OSError) as info:
            os.rmdir(core.root / "r")
        assert info.value.errno == errno.EBUSY
        core.destroy("r")
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert not (core.root / "r").exists()
    finally:
        proc.kill()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- controllers


def delegable(core: Cgroup2Backend, wanted: tuple[str, ...] = CONTROLLERS) -> list[str]:
    """Domain controllers that can be handed to the test's partitions, enabled on the way.

    On the mount's root cgroup we may enable an offered controller ourselves: the root is
    exempt from the no-internal-processes rule. It stays enabled afterwards, as a cgroup2
    daemon would leave it - disabling it could pull it from under a parallel run."""
    own = core.own_dir
    if own == core.mount:
        offered = tokens(own / "cgroup.controllers")
        for c in wanted:
            if c in offered and c not in tokens(own / "cgroup.subtree_control"):
                fs.write_text(own / "cgroup.subtree_control", f"+{c}")
    enabled = [c for c in wanted if c in tokens(own / "cgroup.subtree_control")]
    # Our root holds no process (the backend keeps them in leaves), so it may pass them on.
    for c in enabled:
        fs.write_text(core.root / "cgroup.subtree_control", f"+{c}")
    return enabled


def test_subtree_control_takes_deltas(core: Cgroup2Backend) -> None:
    build(core, "d")
    found = delegable(core)
    if not found:
        skip_v2("no domain controller can be delegated under this process's cgroup")
    d = core.root / "d"
    control = d / "cgroup.subtree_control"
    # Disabling what is not enabled is a no-op; enabling what is not offered is refused.
    assert write_errno(control, "-" + found[0]) == 0
    assert write_errno(control, "+no-such-controller") == errno.EINVAL
    before = tokens(control)
    first = next((c for c in found if c not in before), None)
    if first is None:
        first = found[0]
        fs.write_text(control, f"-{first}")
        before = tokens(control)
    fs.write_text(control, f"+{first}")
    assert tokens(control) == before | {first}
    fs.write_text(control, f"+{first}")  # idempotent
    assert tokens(control) == before | {first}
    # The child sees the controller (its interface files appear), and may pass it on.
    child = d / "c"
    os.mkdir(child)
    try:
        assert first in tokens(child / "cgroup.controllers")
        assert any(p.name.startswith(f"{first}.") for p in child.iterdir())
        fs.write_text(child / "cgroup.subtree_control", f"+{first}")
        # A controller a child still passes on cannot be taken from it.
        assert write_errno(control, f"-{first}") == errno.EBUSY
        fs.write_text(child / "cgroup.subtree_control", f"-{first}")
    finally:
        os.rmdir(child)
    fs.write_text(control, f"-{first}")
    assert tokens(control) == before - {first}


def test_subtree_control_adds_without_replacing(core: Cgroup2Backend) -> None:
    build(core, "d")
    found = delegable(core)
    if len(found) < 2:
        # Only hugetlb on the hybrid host: this runs in the VM, where the whole set is.
        skip_v2(f"only {found} can be delegated here; a delta over two controllers needs two")
    first, second = found[:2]
    control = core.root / "d/cgroup.subtree_control"
    fs.write_text(control, f"-{first} -{second}")
    others = tokens(control)
    fs.write_text(control, f"+{first}")
    fs.write_text(control, f"+{second}")  # adds to the first, does not replace it
    assert tokens(control) == others | {first, second}
    fs.write_text(control, f"-{first}")
    assert tokens(control) == others | {second}


def test_no_internal_processes_either_way_round(core: Cgroup2Backend) -> None:
    build(core, "i")
    found = delegable(core, DOMAIN_ONLY)
    if not found:
        skip_v2(f"the rule concerns {DOMAIN_ONLY}, and none is offered to cgroup2 here")
    c = found[0]
    d = core.root / "i"
    fs.write_text(d / "cgroup.subtree_control", f"+{c}")
    busy, empty = d / f"busy-{uuid.uuid4().hex[:6]}", d / f"split-{uuid.uuid4().hex[:6]}"
    os.mkdir(busy)
    os.mkdir(empty)
    proc = core.spawn(request("i", "i-0", ["sleep", "300"]))
    try:
        # Once the spawn shim has put itself in the leaf (else it would move it back).
        assert wait_for(lambda: core.pids("i", "i-0") == [proc.pid])
        fs.write_text(busy / "cgroup.procs", str(proc.pid))
        assert fs.read_procs(busy) == [proc.pid]
        # A cgroup with a process cannot hand a domain controller to children ...
        assert write_errno(busy / "cgroup.subtree_control", f"+{c}") == errno.EBUSY
        # ... and one that does cannot take a process.
        fs.write_text(empty / "cgroup.subtree_control", f"+{c}")
        assert write_errno(empty / "cgroup.procs", str(proc.pid)) == errno.EBUSY
        assert fs.read_procs(busy) == [proc.pid]
        # Which is why the backend keeps processes in leaves: its partition "i" enabled
        # controllers and still has its worker, one level down.
        fs.write_text(core.root / "i/@i-0/cgroup.procs", str(proc.pid))
        assert core.pids("i", "i-0") == [proc.pid]
    finally:
        proc.kill()
        proc.wait(timeout=30)
        for x in (busy, empty):
            fs.rmdir_retry(x, "i")
