"""cgroup v1 files for real-time partitions (docs/realtime.md): the ``cpuset`` controller
and the ``cpu`` controller's RT group scheduling.

cpuset: a new v1 cpuset cgroup starts with empty ``cpuset.cpus`` and ``cpuset.mems``, and
the kernel refuses to put a task into it until both are set. ``cgroup.clone_children = 1``
makes a new child copy its parent's at ``mkdir`` and is itself inherited, so we set it once
on our root (after copying the root's figures from the daemon's own cpuset): every
partition and worker leaf below then starts with its parent's CPUs and memory nodes, and a
partition with a ``cpuset`` key narrows its CPUs. The kernel itself refuses a child cpuset
outside its parent's (EINVAL) and a parent that would shrink below its children's (EBUSY);
the config loader reports both earlier, with the key.

RT group scheduling (kernels with ``CONFIG_RT_GROUP_SCHED``: ``cpu.rt_runtime_us``
exists): a cgroup may run fifo/rr tasks for at most ``cpu.rt_runtime_us`` of every
``cpu.rt_period_us``, a new cgroup starts with 0 (``sched_setscheduler`` then fails with
EPERM), and a cgroup's runtime must cover the sum of its children's. The loader computes
each partition's share (``config/realtime.py``); here it is written top-down: our root,
each partition, each worker leaf. It is a kernel bound on the real-time tenants on top of
the machine-wide RT throttling (``/proc/sys/kernel/sched_rt_runtime_us``).
"""

from __future__ import annotations

from pathlib import Path

from supervisord_qnx.partition import cgroupfs as fs
from supervisord_qnx.partition.realtime import format_cpulist
from supervisord_qnx.partition.tree import Partition

RT_FILE = "cpu.rt_runtime_us"


def init_cpuset_root(root: Path) -> None:
    """Give our cpuset root the daemon's CPUs and memory nodes, and have every cgroup
    below copy its parent's at creation."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        if not fs.read_text(root / name).strip():
            fs.write_text(root / name, fs.read_text(root.parent / name).strip() or "0")
    fs.write_text(root / "cgroup.clone_children", "1")


def write_cpuset(directory: Path, node: Partition) -> None:
    assert node.cpuset is not None
    if not fs.read_text(directory / "cpuset.mems", node.path).strip():
        parent_mems = fs.read_text(directory.parent / "cpuset.mems", node.path).strip()
        fs.write_text(directory / "cpuset.mems", parent_mems, node.path)
    fs.write_text(directory / "cpuset.cpus", format_cpulist(node.cpuset), node.path)


def write_rt_runtime(directory: Path, root: Path, node: Partition) -> None:
    """RT runtime of one partition, after making sure our root has the whole tree's."""
    if not (directory / RT_FILE).exists():
        return  # no RT group scheduling in this kernel: fifo/rr need no budget
    top = node
    for up in node.ancestors():
        top = up
    have = fs.try_read_int(root / RT_FILE) or 0
    if top.rt_runtime_us > have:
        fs.write_text(root / RT_FILE, str(top.rt_runtime_us), node.path)
    fs.write_text(directory / RT_FILE, str(node.rt_runtime_us), node.path)


def write_leaf_rt_runtime(directory: Path, node: Partition) -> None:
    if (directory / RT_FILE).exists():
        fs.write_text(directory / RT_FILE, str(node.rt_leaf_runtime_us), node.path)
