"""The ``partitions`` report: the admitted tree with each partition's live figures, its
name in the OS, and what the backend enforces. Shared by the control method and the
daemon CLI's ``--check``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from supervisord_qnx.partition.backend import Backend, PartitionStats, unenforced
from supervisord_qnx.partition.realtime import format_cpulist, readback_many
from supervisord_qnx.partition.tree import PartitionTree

# How many pids of one partition the report lists (the count is always complete).
MAX_LISTED_PIDS = 64


def realtime_fields(tree: PartitionTree, path: str) -> dict[str, Any]:
    """The CPUs a partition's processes may use (its own ``cpuset`` or the nearest
    ancestor's; None: every CPU) and its APS critical budget (docs/realtime.md)."""
    node = tree[path] if path else tree.root
    cpus = node.effective_cpuset
    critical = None
    if node.critical_budget_ms is not None:
        critical = {"budget_ms": node.critical_budget_ms, "priority": node.critical_priority}
    return {
        "cpuset": None if cpus is None else format_cpulist(cpus),
        "cpu_critical": critical,
    }


LIVE_STATES = ("starting", "running", "stopping")


# Up to this many live workers, status reads their scheduling on the event loop.
INLINE_SCHED_PIDS = 64


async def with_sched(rows: list[dict[str, Any]], blocking: Callable[..., Awaitable[Any]]) -> None:
    """Add each live worker's scheduling as the kernel reports it (``sched``: policy,
    priority, nice, cpus; None when not running): not the configured values, which a
    program may have changed. Many workers: one thread for all the syscalls."""
    pids = [r["pid"] for r in rows if r.get("pid") and r.get("state") in LIVE_STATES]
    if len(pids) <= INLINE_SCHED_PIDS:
        # Four syscalls a pid that never wait for I/O: for a few dozen workers, cheaper
        # on the event loop than a thread hand-off, and never queued behind the slow-I/O
        # pool's logs/partitions/metrics reads (docs/reliability.md, "status latency").
        read = readback_many(pids)
    else:
        read = await blocking(readback_many, pids)
    for r in rows:
        r["sched"] = read.get(r.get("pid") or 0) if r.get("state") in LIVE_STATES else None


def enforcement_table(backend: Backend) -> dict[str, str]:
    return {str(c): str(e) for c, e in backend.enforcement().items()}


async def partitions_report(
    backend: Backend,
    tree: PartitionTree,
    blocking: Callable[..., Awaitable[Any]],
    overrides: dict[str, dict[str, Any]] | None = None,
    under: str = "",
) -> dict[str, Any]:
    """``blocking`` runs the backend's (blocking) ``stats_many`` call off the event loop:
    one call for every partition, so a backend that scans /proc scans it once. With
    ``under``, that partition's subtree only (its figures alone are read)."""
    stats: dict[str, Any] = {}
    nodes = tree.subtree(under)
    read: dict[str, PartitionStats | Exception] = await blocking(
        backend.stats_many, [node.path for node in nodes]
    )
    for node in nodes:
        s = read.get(node.path)
        if not isinstance(s, PartitionStats):  # a stats failure must not break the report
            stats[node.path] = {"error": str(s)}
            continue
        figures = {k: v for k, v in vars(s).items() if k != "pids"}
        figures["pids"] = s.pids[:MAX_LISTED_PIDS]
        stats[node.path] = figures
    mapping = backend.describe(tree)
    shown = {node.path for node in nodes}
    unenforced_list = [
        {"partition": p, "control": str(c)} for p, c in unenforced(backend, tree) if p in shown
    ]

    def decorate(node: dict[str, Any]) -> dict[str, Any]:
        node["usage"] = stats.get(node["path"])
        node["os_name"] = mapping.get(node["path"])
        # Figures changed with `set`, in force until the next reload (None: as configured).
        node["override"] = (overrides or {}).get(node["path"])
        node.update(realtime_fields(tree, node["path"]))
        node["children"] = [decorate(c) for c in node["children"]]
        return node

    return {
        "backend": backend.name,
        "enforcement": enforcement_table(backend),
        "unenforced": unenforced_list,
        "tree": decorate(tree.as_dict(under)),
    }
