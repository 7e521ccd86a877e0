"""A partition's figures as one value, tree copies, and runtime overrides. Pure: no I/O.

Reload and ``set`` both change a live partition's figures without touching its
processes. They share three things kept here:

* ``Limits``: the six figures of one partition (``memory.min/max/reserved``,
  ``cpu.budget/max``, ``pids``) as a value that can be compared, diffed and laid
  onto a ``Partition``;
* ``copy_tree``: a new tree beside the live one, so that a change is admitted as a
  whole (``PartitionTree.admit``) before anything is written to a backend;
* ``Overrides``: what operators set at runtime, per partition, in a plain form
  (``to_dict``/``from_dict``) that a state file can persist. The next reload drops
  them: the files are the truth, an override is a temporary departure from them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisord_qnx.partition.tree import Partition, PartitionTree
from supervisord_qnx.units import format_size, parse_size

# The figure attributes of ``Partition``, and their names in configs and on the wire.
FIGURES: dict[str, str] = {
    "memory_min": "memory.min",
    "memory_max": "memory.max",
    "memory_reserved": "memory.reserved",
    "cpu_budget": "cpu.budget",
    "cpu_max": "cpu.max",
    "pids_max": "pids",
}
WIRE_TO_FIGURE = {wire: attr for attr, wire in FIGURES.items()}


@dataclass(frozen=True)
class Limits:
    """The figures of one partition; ``None`` means "no limit of its own"."""

    memory_min: int = 0
    memory_max: int | None = None
    memory_reserved: int = 0
    cpu_budget: float | None = None
    cpu_max: float | None = None
    pids_max: int | None = None

    @classmethod
    def of(cls, node: Partition) -> Limits:
        return cls(**{attr: getattr(node, attr) for attr in FIGURES})

    def apply(self, node: Partition) -> None:
        """Lay these figures onto ``node`` (its flags, parent and children stay)."""
        for attr in FIGURES:
            setattr(node, attr, getattr(self, attr))

    def on(self, node: Partition) -> Partition:
        """A copy of ``node`` carrying these figures: what a backend is asked to apply.
        It keeps ``node``'s parent, so effective (inherited) bounds still resolve."""
        return dataclasses.replace(node, **{attr: getattr(self, attr) for attr in FIGURES})

    def changes(self, new: Limits) -> dict[str, list[Any]]:
        """``{"memory.max": [old, new], ...}`` for every figure that differs."""
        return {
            wire: [getattr(self, attr), getattr(new, attr)]
            for attr, wire in FIGURES.items()
            if getattr(self, attr) != getattr(new, attr)
        }

    def tightest(self, other: Limits) -> Limits:
        """Per figure, the tighter of the two (``None`` is unbounded, so the other wins).

        A resize first lowers every partition to this, deepest first, then raises it to
        its new figures, parents first: at no moment does a child's figure exceed its
        parent's, which kernels check for some controls (cgroup v1 CFS quota, QNX APS
        budgets). It stays consistent: if both sides keep ``min + reserved <= max`` and
        ``budget <= cpu.max``, so does the per-figure minimum."""
        values = {}
        for attr in FIGURES:
            a, b = getattr(self, attr), getattr(other, attr)
            values[attr] = b if a is None else a if b is None else min(a, b)
        return Limits(**values)

    def as_wire(self) -> dict[str, Any]:
        return {wire: getattr(self, attr) for attr, wire in FIGURES.items()}


def copy_tree(tree: PartitionTree) -> PartitionTree:
    """A deep copy of ``tree``'s nodes (parents before children), for changing one beside
    the live one. Nodes are new objects: changing the copy never changes the original."""
    out = PartitionTree()
    for node in tree:
        fresh = dataclasses.replace(node, parent=None, children={})
        out.add(fresh, node.parent.path if node.parent is not None else "")
    return out


class BadLimits(ValueError):
    """A ``set`` request names a figure wrongly; the message says which and why."""


def parse_set(
    memory: Mapping[str, Any] | None, cpu: Mapping[str, Any] | None, pids: Any
) -> dict[str, Any]:
    """Turn ``set``'s ``memory``/``cpu``/``pids`` parameters into ``{attr: value}``.

    Sizes are byte counts or strings such as ``"64MiB"``; ``memory.max``, ``cpu.*`` and
    ``pids`` also take ``None`` ("no limit of its own"). Raises ``BadLimits``."""
    out: dict[str, Any] = {}
    for group, value, keys in (("memory", memory, ("min", "max", "reserved")),
                               ("cpu", cpu, ("budget", "max"))):  # fmt: skip
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise BadLimits(f"{group} must be a map such as {{'max': '64MiB'}}")
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise BadLimits(f"{group}: unknown key(s) {', '.join(unknown)}; allowed: {keys}")
        for key, figure in value.items():
            attr = WIRE_TO_FIGURE[f"{group}.{key}"]
            out[attr] = _figure(f"{group}.{key}", figure)
    if pids is not None:
        out["pids_max"] = _figure("pids", pids)
    if not out:
        raise BadLimits("nothing to set: give memory, cpu or pids")
    return out


def _figure(name: str, value: Any) -> Any:
    if name in ("memory.min", "memory.reserved"):
        if value is None:
            return 0
        return _size(name, value)
    if name == "memory.max":
        return None if value is None else _size(name, value)
    if name.startswith("cpu."):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadLimits(f"{name} must be a percentage of the machine (0 < x <= 100)")
        if not (0 < value <= 100) or math.isnan(value):
            raise BadLimits(f"{name} must be a percentage of the machine (0 < x <= 100)")
        return float(value)
    # pids
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadLimits("pids must be a positive integer")
    return value


def _size(name: str, value: Any) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise BadLimits(f"{name}: {exc}") from None


def describe(attr: str, value: Any) -> str:
    """One figure for a human: sizes as sizes, percentages with %."""
    if value is None:
        return "none"
    if attr.startswith("memory_"):
        return format_size(int(value))
    if attr.startswith("cpu_"):
        return f"{value:g}%"
    return str(value)


class Overrides:
    """Figures set at runtime with ``set``, per partition path, in the wire's names.

    Kept apart from the tree so that ``partitions`` can show which figures depart from
    the files, and so that the next reload knows what it drops."""

    def __init__(self) -> None:
        self._by_path: dict[str, dict[str, Any]] = {}

    def __contains__(self, path: str) -> bool:
        return path in self._by_path

    def __bool__(self) -> bool:
        return bool(self._by_path)

    def paths(self) -> list[str]:
        return sorted(self._by_path)

    def get(self, path: str) -> dict[str, Any] | None:
        found = self._by_path.get(path)
        return dict(found) if found is not None else None

    def record(self, path: str, figures: Mapping[str, Any]) -> None:
        """Remember ``{attr: value}`` set on ``path`` (merged with earlier sets)."""
        entry = self._by_path.setdefault(path, {})
        entry.update({FIGURES[attr]: value for attr, value in figures.items()})

    def drop(self, path: str) -> None:
        self._by_path.pop(path, None)

    def clear(self) -> list[str]:
        """Forget every override; return the paths that had one."""
        dropped = self.paths()
        self._by_path.clear()
        return dropped

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {path: dict(figures) for path, figures in sorted(self._by_path.items())}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Any]]) -> Overrides:
        out = cls()
        for path, figures in data.items():
            unknown = set(figures) - set(WIRE_TO_FIGURE)
            if unknown:
                raise ValueError(f"override of {path!r}: unknown figure(s) {sorted(unknown)}")
            out._by_path[str(path)] = dict(figures)
        return out
