"""The cgroup2 backend against a kernel with the full controller set (memory included).

These run in the VM (``make test-cgroup2``: Debian's kernel booted over this machine's
filesystem, pure cgroup v2). On a host whose cgroup2 lacks the memory controller (this
CI host's hybrid layout) they skip with the probe's reason; inside the VM
``SUPERVISORD_QNX_REQUIRE_CGROUP2=1`` turns any skip into a failure.

Assertions are on the kernel's own files and on what the backend reports: exit reasons,
events, the processes it lists. The daemon end to end is in ``test_daemon_cgroup2.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from supervisord_qnx.partition import cgroupfs as fs
from supervisord_qnx.partition.backend import (
    BackendError,
    BackendEvent,
    Control,
    Enforcement,
    EventKind,
)
from supervisord_qnx.partition.cgroup_v2 import Cgroup2Backend
from tests.cgroup_helpers import (
    alive,
    cgroup2_core,
    cleaned,
    make_tree,
    require_cgroup2,
    spawn_request,
    unique_instance,
    wait_for,
)

MiB = 1 << 20
HIER = frozenset({"hierarchical"})
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def v2() -> Iterator[Cgroup2Backend]:
    require_cgroup2()
    with cleaned(Cgroup2Backend(instance=unique_instance("v2"), sample_interval=0.05)) as b:
        yield b


def read(d: Path, name: str) -> str:
    return (d / name).read_text().strip()


def test_attach_before_exec(v2: Cgroup2Backend) -> None:
    make_tree(v2, ("tenants", {"flags": HIER}), ("tenants/web", {"memory_max": 64 * MiB}))
    r, w = os.pipe()
    proc = v2.spawn(spawn_request("tenants/web", "web-0", ["cat", "/proc/self/cgroup"], w))
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    assert proc.wait(timeout=60) == 0
    # ``cat`` is the worker: the only line of a pure v2 machine names its leaf.
    assert text.strip().endswith(f"/{v2.root.name}/tenants/web/@web-0"), text
    assert text.startswith("0::")


def test_memory_controls_land_in_the_kernel(v2: Cgroup2Backend) -> None:
    levels = v2.enforcement()
    assert {levels[c] for c in (Control.MEMORY_MIN, Control.MEMORY_MAX)} == {Enforcement.KERNEL}
    make_tree(
        v2,
        (
            "tenants",
            {"flags": HIER, "memory_min": 16 * MiB, "memory_max": 256 * MiB, "cpu_budget": 50},
        ),
        (
            "tenants/web",
            {
                "memory_min": 8 * MiB,
                "memory_max": 64 * MiB,
                "memory_reserved": 16 * MiB,
                "cpu_budget": 10,
                "cpu_max": 50,
                "pids_max": 32,
            },
        ),
    )
    web = v2.root / "tenants/web"
    ncpu = os.cpu_count() or 1
    assert {
        name: read(web, name)
        for name in ("memory.min", "memory.high", "memory.max", "memory.swap.max")
    } == {
        "memory.min": str(8 * MiB),
        "memory.high": str(48 * MiB),  # max - reserved
        "memory.max": str(64 * MiB),
        "memory.swap.max": "0",
    }
    assert read(web, "cpu.weight") == "1000"
    assert read(web, "cpu.max") == f"{round(0.5 * ncpu * 100_000)} 100000"
    assert read(web, "pids.max") == "32"
    v2.ensure_leaf("tenants/web", "web-0")
    assert read(web / "@web-0", "memory.oom.group") == "1"


HOG = "h = []\nfor _ in range(192): h.append(bytearray(1 << 20))\nprint('survived')"


async def test_oom_kill_is_the_hogs_exit_reason_and_its_sibling_lives(v2: Cgroup2Backend) -> None:
    tree = make_tree(v2, ("tenants", {"flags": HIER}), ("tenants/a", {"memory_max": 48 * MiB}))
    events: list[BackendEvent] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(v2.watch, tree, events.append)
        sibling = v2.spawn(spawn_request("tenants/a", "a-1", ["sleep", "300"]))
        try:
            proc = v2.spawn(spawn_request("tenants/a", "a-0", [sys.executable, "-c", HOG]))
            assert await trio.to_thread.run_sync(lambda: proc.wait(timeout=120)) == -9
            assert v2.leaf_exit_reason("tenants/a", "a-0") == "oom-killed"
            with trio.fail_after(30):
                while not any(e.kind is EventKind.OOM_KILL for e in events):
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
            oom = [e for e in events if e.kind is EventKind.OOM_KILL]
            assert {(e.partition, e.leaf) for e in oom} == {("tenants/a", "a-0")}
            # The watch slept on the kernel's POLLPRI, not on sampling.
            assert not v2._notifier.polled
            assert alive(sibling.pid)
            assert v2.leaf_exit_reason("tenants/a", "a-1") is None
            assert fs.read_keyed(v2.root / "tenants/a/@a-1/memory.events")["oom_kill"] == 0
            # memory.events counts killed processes; 6.1 counts an oom.group victim twice
            # (once as the victim, once as a group member), so at least one.
            assert (v2.stats("tenants/a").oom_kills or 0) >= 1
        finally:
            sibling.kill()
            sibling.wait(timeout=30)


HOLD = (
    "import sys, time\n"
    "h = [bytearray(1 << 20) for _ in range(int(sys.argv[1]))]\n"
    "print('holding', flush=True)\n"
    "time.sleep(300)\n"
)


async def test_memory_high_raises_a_pressure_event_without_a_kill(v2: Cgroup2Backend) -> None:
    # high = 128 - 32 = 96 MiB; the worker holds 100 MiB of its own: over high, under
    # max. Not far over: the kernel throttles an allocator in proportion to its excess
    # (which under emulation costs minutes), and not barely: reclaiming the
    # interpreter's file pages alone could keep usage under high.
    tree = make_tree(
        v2,
        ("tenants", {"flags": HIER}),
        ("tenants/p", {"memory_max": 128 * MiB, "memory_reserved": 32 * MiB}),
    )
    events: list[BackendEvent] = []
    r, w = os.pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(v2.watch, tree, events.append)
        proc = v2.spawn(spawn_request("tenants/p", "p-0", [sys.executable, "-c", HOLD, "100"], w))
        os.close(w)
        try:
            with os.fdopen(r, "rb") as f:
                line = await trio.to_thread.run_sync(f.readline)
            assert line == b"holding\n"
            with trio.fail_after(30):
                while not any(e.kind is EventKind.MEMORY_PRESSURE for e in events):
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
            press = next(e for e in events if e.kind is EventKind.MEMORY_PRESSURE)
            assert press.partition == "tenants/p"
            assert press.detail["threshold"] == 96 * MiB and press.detail["max"] == 128 * MiB
            assert fs.read_keyed(v2.root / "tenants/p/memory.events")["high"] >= 1
            # A warning, not a kill.
            assert proc.poll() is None
            assert not [e for e in events if e.kind is EventKind.OOM_KILL]
        finally:
            proc.kill()
            proc.wait(timeout=30)


def test_pids_max_caps_a_fork_bomb_and_destroy_leaves_nothing(v2: Cgroup2Backend) -> None:
    make_tree(v2, ("b", {"pids_max": 8}))
    bomb = "i=0; while [ $i -lt 64 ]; do sleep 300 & i=$((i+1)); done; wait"
    proc = v2.spawn(spawn_request("b", "b-0", ["/bin/sh", "-c", bomb]))
    b = v2.root / "b"
    try:
        # The kernel refused the forks past 8 and counted the refusals (6.1 counts them in
        # the forking task's cgroup, later kernels also where the limit sits).
        def refused() -> bool:
            return any(fs.read_keyed(d / "pids.events").get("max", 0) for d in fs.subtree_dirs(b))

        assert wait_for(refused, 60)
        seen = v2.pids("b")
        assert 1 < len(seen) <= 8 and int(read(b, "pids.current")) <= 8
    finally:
        v2.destroy("b")
        proc.wait(timeout=30)
    assert not b.exists()
    assert not [p for p in seen if alive(p)]


def test_destroy_takes_setsid_escapees(v2: Cgroup2Backend) -> None:
    make_tree(v2, ("k", {"pids_max": 64}))
    r, w = os.pipe()
    spread = "setsid sleep 300 & setsid sleep 300 & echo ready; wait"
    proc = v2.spawn(spawn_request("k", "k-0", ["/bin/sh", "-c", spread], w))
    os.close(w)
    with os.fdopen(r, "rb") as f:
        assert f.readline() == b"ready\n"
    assert wait_for(lambda: len(v2.pids("k")) >= 3)
    members = v2.pids("k")
    v2.destroy("k")
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not [p for p in members if alive(p)]
    assert not (v2.root / "k").exists()


def test_a_foreign_process_in_the_daemons_cgroup_stops_it_with_the_reason() -> None:
    """No-internal-processes at the backend's own cgroup: it will move itself aside, but
    never someone else's process."""
    require_cgroup2()
    mount, own = cgroup2_core()
    home = f"{own.rstrip('/')}/sqnx-own-{uuid.uuid4().hex[:8]}"
    home_dir = mount / home.lstrip("/")
    os.mkdir(home_dir)
    other = subprocess.Popen(["sleep", "300"])
    try:
        fs.write_text(home_dir / "cgroup.procs", str(other.pid))
        b = Cgroup2Backend(instance=unique_instance("own"), mount=mount, own_cgroup=home)
        try:
            with pytest.raises(BackendError) as info:
                make_tree(b, ("p", {"memory_max": 32 * MiB}))
            assert str(other.pid) in str(info.value)
            assert "no-internal-processes" in str(info.value)
            assert sorted(p.name for p in home_dir.iterdir() if p.is_dir()) == []
        finally:
            b.close()
    finally:
        other.kill()
        other.wait(timeout=30)
        fs.rmdir_retry(home_dir, "")


# A daemon alone in its delegated cgroup (systemd's Delegate=yes) moves itself aside.
ALONE = textwrap.dedent(
    """
    import os, sys
    from supervisord_qnx.partition.cgroup_v2 import Cgroup2Backend
    from tests.cgroup_helpers import make_tree

    home, instance = sys.argv[1], sys.argv[2]
    with open(home + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
    b = Cgroup2Backend(instance=instance)
    make_tree(b, ("p", {"memory_max": 32 << 20}))
    print(open("/proc/self/cgroup").read().strip(), flush=True)
    print((b.root / "p" / "memory.max").read_text().strip(), flush=True)
    b.destroy("p")
    b.close()
    """
)


def test_a_daemon_alone_in_its_cgroup_moves_itself_aside() -> None:
    require_cgroup2()
    mount, own = cgroup2_core()
    home_dir = mount / own.lstrip("/") / f"sqnx-alone-{uuid.uuid4().hex[:8]}"
    instance = unique_instance("alone")
    os.mkdir(home_dir)
    try:
        out = subprocess.run(
            [sys.executable, "-c", ALONE, str(home_dir), instance],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert out.returncode == 0, out.stderr
        where, limit = out.stdout.splitlines()
        rel = home_dir.relative_to(mount)
        assert where == f"0::/{rel}/supervisord-qnx.{instance}.daemon"
        assert limit == str(32 * MiB)
        assert "memory" in (home_dir / "cgroup.subtree_control").read_text().split()
    finally:
        for d in fs.subtree_dirs(home_dir):  # deepest first; the child has exited
            fs.rmdir_retry(d, "")
    assert not home_dir.exists()
