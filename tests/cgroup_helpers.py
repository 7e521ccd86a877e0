"""Test-side helpers for the cgroup backends: skip-or-fail gates, trees, waiting, and a few
module-level callables that ``ManagedPartition.run`` can pickle.

The gates: a test that needs a writable controller skips with the probe's reason where
there is none. With ``SUPERVISORD_QNX_REQUIRE_CGROUPS=1`` (CI) a skip turns into a failure
whenever an *independent* raw check (mount options + ``os.access``, not the backend's own
probe) finds the controller writable - so a buggy probe cannot make CI pass by skipping.

pytest is imported lazily: this module is also imported by the pickled-callable children
that ``ManagedPartition.run`` starts inside small memory partitions.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from supervisord_qnx.partition import cgroupfs as fs
from supervisord_qnx.partition.backend import Backend, SpawnRequest
from supervisord_qnx.partition.cgroup_v1 import Cgroup1Backend
from supervisord_qnx.partition.cgroup_v2 import Cgroup2Backend
from supervisord_qnx.partition.tree import Partition, PartitionTree

REQUIRE_ENV = "SUPERVISORD_QNX_REQUIRE_CGROUPS"
# Set by the VM runner (tests/vm/): the guest kernel has full cgroup2, so any cgroup2 test
# that would skip there is a failure, whatever the probe or the raw check says.
REQUIRE_V2_ENV = "SUPERVISORD_QNX_REQUIRE_CGROUP2"


def required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1"


def required_v2() -> bool:
    return os.environ.get(REQUIRE_V2_ENV) == "1"


def skip_v2(reason: str) -> None:
    """Skip a cgroup2 test with ``reason``, or fail it inside the VM (``REQUIRE_V2_ENV``)."""
    import pytest

    if required_v2():
        pytest.fail(f"{REQUIRE_V2_ENV}=1 (the cgroup2 VM run) but this test would skip: {reason}")
    pytest.skip(reason)


def _raw_v1_memory_writable() -> bool:
    own = fs.own_cgroups().get("memory")
    for m in fs.cgroup_mounts():
        if m.fstype == "cgroup" and "memory" in m.options and not m.read_only and own:
            return os.access(m.mountpoint / fs.relative_to_mount(own, m).lstrip("/"), os.W_OK)
    return False


def _raw_v2_memory_writable() -> bool:
    own = fs.own_cgroups().get("")
    for m in fs.cgroup_mounts():
        if m.fstype == "cgroup2" and not m.read_only and own is not None:
            d = m.mountpoint / fs.relative_to_mount(own, m).lstrip("/")
            try:
                offered = (d / "cgroup.controllers").read_text().split()
            except OSError:
                return False
            return "memory" in offered and os.access(d / "cgroup.subtree_control", os.W_OK)
    return False


def _gate(reason: str | None, writable: Callable[[], bool], what: str) -> None:
    import pytest

    if reason is None:
        return
    if required() and writable():
        pytest.fail(
            f"{REQUIRE_ENV}=1 and the {what} controller is writable here, but the backend "
            f"probe says: {reason}"
        )
    pytest.skip(f"{what} not usable here: {reason}")


def require_cgroup1() -> None:
    """Skip (or, under CI's require flag, fail) unless the v1 memory hierarchy is usable."""
    from supervisord_qnx.partition.cgroup_v1 import Cgroup1Backend

    _gate(Cgroup1Backend.probe(), _raw_v1_memory_writable, "cgroup v1 memory")


def require_cgroup2() -> None:
    """Skip unless the cgroup2 memory controller is usable: on a host whose kernel offers
    no v2 memory controller (hybrid layout). Fails instead in the VM run, and under CI's
    require flag where the raw check finds the controller writable."""
    from supervisord_qnx.partition.cgroup_v2 import Cgroup2Backend

    why = Cgroup2Backend.probe()
    if why is not None and required_v2():
        skip_v2(f"cgroup2 memory not usable: {why}")
    _gate(why, _raw_v2_memory_writable, "cgroup2 memory")


def cgroup2_core() -> tuple[Path, str]:
    """The cgroup2 mount and this process's cgroup in it, if both are writable (the core
    needs no controller at all); skips with the reason otherwise."""
    mount = next((m for m in fs.cgroup_mounts() if m.fstype == "cgroup2"), None)
    if mount is None:
        skip_v2("no cgroup2 hierarchy is mounted")
        raise AssertionError("unreachable")
    own = fs.relative_to_mount(fs.own_cgroups().get("", "/"), mount)
    own_dir = mount.mountpoint / own.lstrip("/")
    if mount.read_only or not os.access(own_dir, os.W_OK):
        skip_v2(f"the cgroup2 hierarchy at {own_dir} is not writable here")
    return mount.mountpoint, own


def make_tree(backend: Backend, *nodes: tuple[str, dict[str, Any]]) -> PartitionTree:
    """Admit ``(path, Partition keywords)`` nodes as one tree and create them in order."""
    tree = PartitionTree()
    for path, kw in nodes:
        tree.add(Partition(path, **kw), path.rpartition("/")[0])
    assert tree.admit() == []
    for node in tree:
        backend.create(node)
    return tree


def spawn_request(
    partition: str, leaf: str, argv: list[str], stdout: int = subprocess.DEVNULL
) -> SpawnRequest:
    return SpawnRequest(partition, leaf, argv, None, dict(os.environ), stdout, 2)


def unique_instance(tag: str = "t") -> str:
    return f"test-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def alive(pid: int) -> bool:
    """Running (not a zombie, not gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


B = TypeVar("B", Cgroup1Backend, Cgroup2Backend)


@contextlib.contextmanager
def cleaned(backend: B) -> Iterator[B]:
    """Hand out a real backend; afterwards reap and close it, and fail the test if any
    cgroup directory of its root is left behind."""
    try:
        yield backend
    finally:
        try:
            backend.reap_leftovers()
        finally:
            backend.close()
        assert not list(tree_dirs(backend.roots)), "the test left cgroup directories behind"


def tree_dirs(roots: list[Path]) -> Iterator[Path]:
    for r in roots:
        if r.exists():
            yield from fs.subtree_dirs(r)


# ---- callables for ManagedPartition.run (module level so they pickle by reference)


def add(a: int, b: int) -> int:
    return a + b


def whoami_cgroup() -> str:
    with open("/proc/self/cgroup") as f:
        return f.read()


def fail_with(message: str) -> None:
    raise ValueError(message)


def allocate(megabytes: int) -> int:
    """Touch ``megabytes`` MiB of anonymous memory (bytearray zero-fills every page)."""
    hoard = [bytearray(1 << 20) for _ in range(megabytes)]
    return len(hoard)
