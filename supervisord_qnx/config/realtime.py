"""Real-time keys across files (docs/realtime.md): a worker's effective settings (its own
keys over its tenant's), the load-time checks that need the partition tree and the
daemon file, and the RT runtime each partition needs under Linux RT group scheduling.

Pure: the tree and the specs in, problems and figures out.
"""

from __future__ import annotations

import dataclasses
import resource
from dataclasses import dataclass
from typing import Any

from supervisord_qnx.config.model import Config, DaemonSpec, Realtime, TenantSpec
from supervisord_qnx.partition import realtime
from supervisord_qnx.partition.process import ProcessSettings
from supervisord_qnx.partition.tree import Partition, PartitionTree

# Under RT group scheduling (CONFIG_RT_GROUP_SCHED, cgroup v1 ``cpu.rt_runtime_us``) a
# cgroup may run fifo/rr tasks for at most its runtime per period, and a child's runtime
# is carved from its parent's. RT_PERIOD_US is the kernel's default period; a tenant with
# ``cpu.max`` gets that share of it, one without (allowed by ``allow_unbounded_realtime``)
# shares UNBOUNDED_SHARE of it with the other unbounded ones.
RT_PERIOD_US = 1_000_000
UNBOUNDED_SHARE = 0.5


@dataclass(frozen=True)
class RealtimeProblem:
    tenant: str
    key: str  # as written in the tenant file: "sched.policy", "worker[0].cpus"
    reason: str


def effective(
    tenant: Realtime, worker: Realtime, base: ProcessSettings | None = None
) -> ProcessSettings:
    """The worker's own keys over its tenant's, as the spawn path applies them; the
    other fields (identity, privileges) are ``base``'s."""
    sched = worker.sched if worker.sched is not None else tenant.sched
    cpus = worker.cpus if worker.cpus is not None else tenant.cpus
    memlock = worker.memlock if worker.memlock is not None else tenant.memlock
    return dataclasses.replace(
        base if base is not None else ProcessSettings(),
        sched_policy="" if sched is None else sched.policy,
        sched_priority=0 if sched is None else sched.priority,
        nice=None if sched is None else sched.nice,
        cpus=tuple(cpus or ()),
        memlock=_memlock_bytes(memlock),
    )


def _memlock_bytes(value: bool | int | None) -> int | None:
    if value is None or value is False:
        return None
    return -1 if value is True else int(value)


def bounded(node: Partition) -> bool:
    """Has the partition a ``cpu.max`` below 100 % of the CPUs it may use?"""
    cap = node.effective_cpu_max
    if cap is None:
        return False
    cpus = node.effective_cpuset
    ncpu = len(realtime.host_cpus())
    share = 100.0 * (len(cpus) if cpus is not None else ncpu) / ncpu
    return cap < share


def problems(
    daemon: DaemonSpec, tenants: list[TenantSpec], tree: PartitionTree
) -> list[RealtimeProblem]:
    out: list[RealtimeProblem] = []
    for t in tenants:
        if t.path not in tree:
            continue  # its partition was refused; that problem is reported already
        node = tree[t.path]
        allowed = node.effective_cpuset
        owners: list[tuple[str, Realtime]] = [("", t)]
        owners += [(f"worker[{i}].", w) for i, w in enumerate(t.worker)]
        for prefix, owner in owners:
            if owner.cpus is not None and allowed is not None:
                outside = sorted(set(owner.cpus) - allowed)
                if outside:
                    out.append(
                        RealtimeProblem(
                            t.name,
                            f"{prefix}cpus",
                            f"CPU {realtime.format_cpulist(outside)} is outside the cpuset "
                            f"{realtime.format_cpulist(allowed)} of partition '{t.path}'",
                        )
                    )
            problem = memlock_problem(_memlock_bytes(owner.memlock))
            if problem:
                out.append(RealtimeProblem(t.name, f"{prefix}memlock", problem))
            sched = owner.sched
            if (
                sched is not None
                and sched.policy in realtime.REALTIME
                and not daemon.allow_unbounded_realtime
                and not bounded(node)
            ):
                out.append(
                    RealtimeProblem(
                        t.name,
                        f"{prefix}sched.policy",
                        f"policy {sched.policy!r} can starve the machine: give partition "
                        f"'{t.path}' a cpu.max below 100% of its CPUs, or set [daemon] "
                        "allow_unbounded_realtime = true",
                    )
                )
    return out


def memlock_problem(limit: int | None) -> str | None:
    """Why the daemon cannot give a worker this RLIMIT_MEMLOCK: raising a hard limit needs
    CAP_SYS_RESOURCE, which a container may withhold even from root."""
    if limit is None:
        return None
    _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    wanted = resource.RLIM_INFINITY if limit < 0 else limit
    if hard == resource.RLIM_INFINITY or (wanted != resource.RLIM_INFINITY and wanted <= hard):
        return None
    if _has_capability(CAP_SYS_RESOURCE):
        return None
    return (
        f"the daemon cannot raise RLIMIT_MEMLOCK above its own hard limit of {hard} bytes "
        "without CAP_SYS_RESOURCE; ask for at most that, or run the daemon with the "
        "capability"
    )


CAP_SYS_RESOURCE = 24


def _has_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return False


def assign_rt_runtime(tenants: list[TenantSpec], tree: PartitionTree) -> None:
    """Set ``rt_runtime_us`` on every partition that holds fifo/rr workers and on each of
    its ancestors (the sum of its children's), so that the cgroup v1 backend can give
    those cgroups the RT runtime the kernel requires before it accepts a fifo/rr task."""
    needs: dict[str, tuple[int, int]] = {}  # tenant path -> (runtime, leaves)
    unbounded: list[TenantSpec] = []
    for t in tenants:
        if t.path not in tree or not _has_realtime(t):
            continue
        node = tree[t.path]
        if bounded(node):
            assert node.effective_cpu_max is not None
            needs[t.path] = (round(node.effective_cpu_max / 100 * RT_PERIOD_US), 0)
        else:
            unbounded.append(t)
    for t in unbounded:
        needs[t.path] = (round(UNBOUNDED_SHARE * RT_PERIOD_US / len(unbounded)), 0)
    for t in tenants:
        if t.path not in needs:
            continue
        runtime, _ = needs[t.path]
        leaves = sum(w.instances for w in t.worker)
        node = tree[t.path]
        node.rt_runtime_us = runtime
        # Every worker leaf may hold a fifo task; they share the tenant's runtime.
        node.rt_leaf_runtime_us = runtime // max(1, leaves)
        for up in node.ancestors():
            up.rt_runtime_us += runtime


def _has_realtime(t: TenantSpec) -> bool:
    return any(effective(t, w).sched_policy in realtime.REALTIME for w in t.worker)


def realtime_check(config: Config, tree: PartitionTree) -> dict[str, Any]:
    """What ``--check`` says about real time: the kernel's RT throttling (kept on: the
    daemon never changes it) and every worker with a real-time policy, with the RT
    runtime its partition gets under RT group scheduling."""
    workers = []
    for t in config.tenants:
        for w in t.worker:
            s = effective(t, w)
            if s.sched_policy or s.cpus or s.memlock is not None:
                node = tree[t.path]  # a loaded config has every tenant's partition
                workers.append(
                    {
                        "worker": f"{t.name}:{w.name}",
                        "policy": s.sched_policy or None,
                        "priority": s.sched_priority if s.sched_policy else None,
                        "cpus": realtime.format_cpulist(s.cpus) if s.cpus else None,
                        "memlock": s.memlock,
                        "partition_rt_runtime_us": node.rt_runtime_us,
                    }
                )
    return {"rt_throttling": realtime.rt_throttling(), "workers": workers}


def realtime_lines(report: dict[str, Any]) -> list[str]:
    thr = report["rt_throttling"]
    if thr["runtime_us"] is None:
        head = "real time: RT throttling unknown (no /proc/sys/kernel/sched_rt_runtime_us)"
    elif thr["enabled"]:
        head = (
            f"real time: RT throttling on: real-time tasks get at most "
            f"{thr['runtime_us']} of every {thr['period_us']} µs per CPU "
            "(kernel.sched_rt_runtime_us; the daemon keeps it)"
        )
    else:
        head = (
            "real time: RT throttling OFF (kernel.sched_rt_runtime_us = -1): a runaway "
            "fifo/rr worker can starve the machine; consider re-enabling it"
        )
    lines = [head]
    for w in report["workers"]:
        what = []
        if w["policy"]:
            what.append(f"{w['policy']}/{w['priority']}")
        if w["cpus"]:
            what.append(f"cpus {w['cpus']}")
        if w["memlock"] is not None:
            what.append("memlock " + ("unlimited" if w["memlock"] < 0 else str(w["memlock"])))
        if w["partition_rt_runtime_us"]:
            what.append(f"partition RT runtime {w['partition_rt_runtime_us']} µs/s")
        lines.append(f"  {w['worker']}: {', '.join(what)}")
    return lines
