"""The partition tree and its admission rules. Pure: no I/O, no backend.

Rules (each violation is a ``Problem`` naming both partitions and the numbers):

1. A child exists only under a ``hierarchical`` partition (the root is one).
2. A child's ``memory.max`` is at most its parent's effective max.
3. The children's ``memory.min`` add up to at most the parent's ``min``
   (the root's min is the machine: unbounded here).
4. ``min + reserved <= max`` (checked in the model, repeated here for
   partitions built in code).
5. The children's ``cpu.budget`` add up to at most the parent's budget: as in
   QNX adaptive partitioning, a child's budget is carved out of its parent's.
   The root's budget is 100 (% of the machine).
6. ``cpu.max >= cpu.budget``, and a child's ``cpu.max`` is at most its parent's.
7. A child's ``pids`` is at most its parent's.

A partition that sets no figure inherits its parent's bound for that control;
``effective_*`` gives the bound in force, which is what backends without a
hierarchy of their own (portable, QNX rlimits) must apply.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from supervisord_qnx.partition.controls import Control, Flag
from supervisord_qnx.partition.realtime import format_cpulist, parse_cpulist
from supervisord_qnx.units import format_size

ROOT = ""


class _MemoryLike(Protocol):
    min: int
    max: int | None
    reserved: int


class _CpuLike(Protocol):
    budget: float | None
    max: float | None


class PartitionSpecLike(Protocol):
    """What ``build`` reads from a config model (kept structural so this module imports
    no pydantic)."""

    @property
    def name(self) -> str: ...
    @property
    def parent(self) -> str: ...
    @property
    def flags(self) -> Sequence[str]: ...
    @property
    def memory(self) -> _MemoryLike: ...
    @property
    def cpu(self) -> _CpuLike: ...
    @property
    def pids(self) -> int | None: ...


@dataclass(frozen=True)
class Problem:
    """One admission failure; ``key`` is the config key path (``memory.max``)."""

    partition: str
    key: str
    reason: str


@dataclass
class Partition:
    """One node. Paths are ``/``-joined names from the root (which has path ``""``)."""

    path: str
    flags: frozenset[str] = frozenset()
    memory_min: int = 0
    memory_max: int | None = None
    memory_reserved: int = 0
    cpu_budget: float | None = None
    cpu_max: float | None = None
    pids_max: int | None = None
    tenant: str | None = None  # set on a tenant's own partition
    # -- real-time (issue 15): CPUs this partition owns (cgroup cpuset; None: the
    # parent's), the QNX APS critical budget, and the RT runtime (µs per second) this
    # partition's subtree needs under Linux RT group scheduling (0: no fifo/rr inside).
    cpuset: frozenset[int] | None = None
    critical_budget_ms: int | None = None
    critical_priority: int | None = None
    rt_runtime_us: int = 0
    rt_leaf_runtime_us: int = 0  # each worker leaf's share of it (cgroup v1 leaves)
    seccomp: str = "none"  # a tenant's syscall filter profile (partition/seccomp.py)
    parent: Partition | None = field(default=None, repr=False)
    children: dict[str, Partition] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def depth(self) -> int:
        return 0 if self.path == ROOT else self.path.count("/") + 1

    @property
    def hierarchical(self) -> bool:
        return self.path == ROOT or Flag.HIERARCHICAL in self.flags

    def ancestors(self) -> Iterator[Partition]:
        node = self.parent
        while node is not None:
            yield node
            node = node.parent

    @property
    def effective_memory_max(self) -> int | None:
        """The tightest ``max`` on the way to the root: the hard cap actually in force."""
        caps = [p.memory_max for p in (self, *self.ancestors()) if p.memory_max is not None]
        return min(caps) if caps else None

    @property
    def pressure_threshold(self) -> int | None:
        """``max - reserved``: crossing it is memory pressure (cgroup ``memory.high``)."""
        if self.memory_max is None:
            return None
        return self.memory_max - self.memory_reserved

    @property
    def effective_cpu_max(self) -> float | None:
        caps = [p.cpu_max for p in (self, *self.ancestors()) if p.cpu_max is not None]
        return min(caps) if caps else None

    @property
    def effective_cpuset(self) -> frozenset[int] | None:
        """The nearest ``cpuset`` on the way to the root: the CPUs its processes may use."""
        for p in (self, *self.ancestors()):
            if p.cpuset is not None:
                return p.cpuset
        return None

    @property
    def effective_pids_max(self) -> int | None:
        caps = [p.pids_max for p in (self, *self.ancestors()) if p.pids_max is not None]
        return min(caps) if caps else None

    def requested_controls(self) -> list[Control]:
        """The controls this partition's own settings ask a backend to enforce."""
        wanted = []
        if self.memory_min:
            wanted.append(Control.MEMORY_MIN)
        if self.memory_max is not None:
            wanted.append(Control.MEMORY_MAX)
        if self.memory_reserved:
            wanted.append(Control.MEMORY_RESERVED)
        if self.cpu_budget is not None:
            wanted.append(Control.CPU_BUDGET)
        if self.cpu_max is not None:
            wanted.append(Control.CPU_MAX)
        if self.pids_max is not None:
            wanted.append(Control.PIDS)
        if Flag.MEMORY_ISOLATION in self.flags:
            wanted.append(Control.MEMORY_ISOLATION)
        if Flag.CONTAINER in self.flags:
            wanted.append(Control.CONTAINER)
        if self.cpuset is not None:
            wanted.append(Control.CPUSET)
        if self.critical_budget_ms is not None:
            wanted.append(Control.CPU_CRITICAL)
        if self.seccomp != "none":
            wanted.append(Control.SECCOMP)
        return wanted

    def limits(self) -> dict[str, object]:
        """The configured figures, in the config's vocabulary (for ``partitions``/``--check``)."""
        return {
            "memory": {
                "min": self.memory_min,
                "max": self.memory_max,
                "reserved": self.memory_reserved,
            },
            "cpu": {"budget": self.cpu_budget, "max": self.cpu_max},
            "pids": self.pids_max,
        }


class PartitionTree:
    """All partitions, addressed by path, parents before children in iteration order."""

    def __init__(self) -> None:
        self.root = Partition(ROOT, flags=frozenset({Flag.HIERARCHICAL}), cpu_budget=100.0)
        self._nodes: dict[str, Partition] = {ROOT: self.root}

    def __contains__(self, path: str) -> bool:
        return path in self._nodes

    def __getitem__(self, path: str) -> Partition:
        return self._nodes[path]

    def __iter__(self) -> Iterator[Partition]:
        """Every partition but the root, parents before children (creation order)."""
        return iter(sorted((p for p in self._nodes.values() if p.path), key=_depth_order))

    def __len__(self) -> int:
        return len(self._nodes) - 1

    def deepest_first(self, under: str = ROOT) -> list[Partition]:
        """The subtree below ``under`` (itself included unless root), children before parents."""
        return sorted(self.subtree(under), key=lambda p: (-p.depth, p.path))

    def add(self, node: Partition, parent_path: str) -> Partition:
        """Link ``node`` under ``parent_path``. Raises KeyError if the parent is unknown."""
        parent = self._nodes[parent_path]
        node.parent = parent
        parent.children[node.name] = node
        self._nodes[node.path] = node
        return node

    def remove(self, path: str) -> None:
        """Unlink a partition and its subtree (for dynamic leaves and reload)."""
        node = self._nodes.pop(path)
        for child in list(node.children):
            self.remove(f"{path}/{child}")
        if node.parent is not None:
            node.parent.children.pop(node.name, None)

    def admit(self) -> list[Problem]:
        """Check every admission rule over the whole tree; return every violation."""
        problems: list[Problem] = []
        for node in self:
            problems.extend(_node_problems(node))
        for node in (self.root, *self):
            problems.extend(_sibling_problems(node))
        return problems

    def tenants(self) -> Iterable[Partition]:
        return (p for p in self if p.tenant is not None)

    def as_dict(self, under: str = ROOT) -> dict[str, object]:
        """The tree (or the subtree at ``under``) as nested plain data (for ``partitions``
        and ``--check --json``)."""

        def node_dict(node: Partition) -> dict[str, object]:
            return {
                "path": node.path,
                "name": node.name or "/",
                "tenant": node.tenant,
                "flags": sorted(node.flags),
                "limits": node.limits(),
                "children": [node_dict(c) for c in node.children.values()],
            }

        return node_dict(self._nodes[under])

    def subtree(self, under: str = ROOT) -> list[Partition]:
        """``under`` and every partition below it, parents first (all, for the root)."""
        if not under:
            return list(self)
        prefix = under + "/"
        return [p for p in self if p.path == under or p.path.startswith(prefix)]


def _depth_order(p: Partition) -> tuple[int, str]:
    return (p.depth, p.path)


def _cpulist(cpus: Iterable[int]) -> str:
    return format_cpulist(cpus)


def _label(node: Partition) -> str:
    return f"'{node.path}'" if node.path else "the root partition"


def _node_problems(node: Partition) -> list[Problem]:
    out = []
    parent = node.parent
    assert parent is not None
    if not parent.hierarchical:
        out.append(
            Problem(
                node.path,
                "parent",
                f"{_label(parent)} is not 'hierarchical', so it cannot hold '{node.path}'; "
                f'add flags = ["hierarchical"] to {_label(parent)}',
            )
        )
    if node.memory_max is not None:
        if node.memory_min + node.memory_reserved > node.memory_max:
            out.append(
                Problem(
                    node.path,
                    "memory",
                    f"min + reserved ({format_size(node.memory_min)} + "
                    f"{format_size(node.memory_reserved)}) exceeds max "
                    f"({format_size(node.memory_max)})",
                )
            )
        cap = parent.effective_memory_max
        if cap is not None and node.memory_max > cap:
            out.append(
                Problem(
                    node.path,
                    "memory.max",
                    f"max {format_size(node.memory_max)} of '{node.path}' exceeds the max "
                    f"{format_size(cap)} in force at {_label(parent)}",
                )
            )
    if node.cpu_budget is not None and node.cpu_max is not None and node.cpu_max < node.cpu_budget:
        out.append(
            Problem(
                node.path,
                "cpu.max",
                f"cpu.max {node.cpu_max:g}% is below cpu.budget {node.cpu_budget:g}%",
            )
        )
    parent_cpu_max = parent.effective_cpu_max
    if node.cpu_max is not None and parent_cpu_max is not None and node.cpu_max > parent_cpu_max:
        out.append(
            Problem(
                node.path,
                "cpu.max",
                f"cpu.max {node.cpu_max:g}% of '{node.path}' exceeds the cpu.max "
                f"{parent_cpu_max:g}% in force at {_label(parent)}",
            )
        )
    parent_cpus = parent.effective_cpuset
    if node.cpuset is not None and parent_cpus is not None and not node.cpuset <= parent_cpus:
        out.append(
            Problem(
                node.path,
                "cpuset",
                f"cpuset {_cpulist(node.cpuset)} of '{node.path}' is not inside the cpuset "
                f"{_cpulist(parent_cpus)} of {_label(parent)}: CPU "
                f"{_cpulist(node.cpuset - parent_cpus)} is not its parent's to give",
            )
        )
    parent_pids = parent.effective_pids_max
    if node.pids_max is not None and parent_pids is not None and node.pids_max > parent_pids:
        out.append(
            Problem(
                node.path,
                "pids",
                f"pids {node.pids_max} of '{node.path}' exceeds the pids {parent_pids} "
                f"in force at {_label(parent)}",
            )
        )
    return out


def _sibling_problems(parent: Partition) -> list[Problem]:
    out: list[Problem] = []
    children = list(parent.children.values())
    if not children:
        return out
    mins = sum(c.memory_min for c in children)
    # The root's min is the whole machine; the physical check is the backend's.
    if parent.path != ROOT and mins > parent.memory_min:
        names = ", ".join(
            f"'{c.path}' {format_size(c.memory_min)}" for c in children if c.memory_min
        )
        out.append(
            Problem(
                parent.path,
                "memory.min",
                f"the children's memory.min add up to {format_size(mins)} ({names}) but "
                f"{_label(parent)} guarantees only {format_size(parent.memory_min)}",
            )
        )
    budgets = sum(c.cpu_budget for c in children if c.cpu_budget is not None)
    parent_budget = parent.cpu_budget if parent.cpu_budget is not None else 0.0
    if budgets > parent_budget + 1e-9:
        names = ", ".join(
            f"'{c.path}' {c.cpu_budget:g}%" for c in children if c.cpu_budget is not None
        )
        out.append(
            Problem(
                parent.path,
                "cpu.budget",
                f"the children's cpu.budget add up to {budgets:g}% ({names}) but "
                f"{_label(parent)} has a budget of {parent_budget:g}% to give",
            )
        )
    return out


def _realtime_fields(spec: PartitionSpecLike) -> dict[str, Any]:
    # Read with getattr: the keys are optional in the structural spec protocol.
    cpuset = getattr(spec, "cpuset", None)
    critical = getattr(spec.cpu, "critical", None)
    return {
        "cpuset": None if cpuset is None else frozenset(parse_cpulist(cpuset)),
        "critical_budget_ms": None if critical is None else critical.budget_ms,
        "critical_priority": None if critical is None else critical.priority,
    }


def build(
    partitions: Iterable[PartitionSpecLike], tenants: Iterable[PartitionSpecLike]
) -> tuple[PartitionTree, list[Problem]]:
    """Build the tree from validated specs (shared groups first, then tenants) and admit it.

    Returns the tree and every problem found: unknown parents, duplicate paths and
    admission-rule violations. A tree with problems must not reach a backend.
    """
    tree = PartitionTree()
    problems: list[Problem] = []
    pending: list[tuple[PartitionSpecLike, str | None]] = [(spec, None) for spec in partitions]
    pending += [(spec, spec.name) for spec in tenants]
    # Groups may name parents declared later in the file: add in rounds until stuck.
    while pending:
        progressed = False
        rest = []
        for spec, tenant in pending:
            if spec.parent not in tree:
                rest.append((spec, tenant))
                continue
            progressed = True
            path = f"{spec.parent}/{spec.name}" if spec.parent else spec.name
            if path in tree:
                problems.append(Problem(path, "name", f"partition '{path}' is declared twice"))
                continue
            tree.add(
                Partition(
                    path,
                    flags=frozenset(spec.flags),
                    memory_min=spec.memory.min,
                    memory_max=spec.memory.max,
                    memory_reserved=spec.memory.reserved,
                    cpu_budget=spec.cpu.budget,
                    cpu_max=spec.cpu.max,
                    pids_max=spec.pids,
                    tenant=tenant,
                    # Only tenants have the key; groups of partitions do not.
                    seccomp=getattr(spec, "seccomp", "none"),
                    **_realtime_fields(spec),
                ),
                spec.parent,
            )
        pending = rest
        if not progressed:
            for spec, _ in pending:
                problems.append(
                    Problem(
                        f"{spec.parent}/{spec.name}",
                        "parent",
                        f"no partition '{spec.parent}' is declared (declare it as a "
                        f"[[partition]] in the daemon config)",
                    )
                )
            break
    return tree, problems + tree.admit()
