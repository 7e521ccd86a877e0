"""The reload diff: what changes between the running configuration and a new one. Pure.

A reload applies only the difference, so that changing one tenant never costs the
others their uptime. ``diff`` compares the live state (the running ``Config`` and the
live partition tree, which may carry ``set`` overrides) with a new, already validated
``Config`` and its admitted tree, and sorts every tenant and partition into one kind
of change:

* **added / removed tenants**: started (if ``autostart``) / stopped, with their
  partitions created parents first / removed deepest first. A tenant whose
  ``parent`` changed lives at another path: it is removed and added again.
* **replaced workers**: a worker whose definition changed in anything but
  ``instances`` (command, args, env, cwd, wasm module or its limits, stop signal or
  timeout...), or every worker of a tenant whose restart policy or flags changed:
  its instances are stopped and started again with the new definition.
* **scaled workers**: only ``instances`` changed (or a worker was added to or removed
  from a kept tenant): instances are added or removed, the others keep running.
* **resized partitions**: same path and kind, other figures: written to the live
  partition in place, no process restarted (``resize_steps`` orders the writes).
* **unchanged tenants**: none of the above touches them.

Daemon settings that only take effect at start-up are listed in ``not_applied``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from supervisord_qnx.config.model import Config, DaemonSpec, TenantSpec, WorkerBase
from supervisord_qnx.partition.limits import Limits
from supervisord_qnx.partition.tree import Partition, PartitionTree

# [daemon] keys a reload applies: they only decide what is read and admitted.
LIVE_DAEMON_KEYS = frozenset({"tenants", "enforcement"})


@dataclass(frozen=True)
class Resize:
    path: str
    old: Limits
    new: Limits
    flags: tuple[list[str], list[str]] | None = None  # (old, new) when the flags changed

    def changes(self) -> dict[str, list[Any]]:
        out = self.old.changes(self.new)
        if self.flags is not None:
            out["flags"] = [self.flags[0], self.flags[1]]
        return out


@dataclass(frozen=True)
class Step:
    """One write of figures to one live partition (see ``resize_steps``)."""

    path: str
    limits: Limits


@dataclass
class ConfigDiff:
    added: list[str] = field(default_factory=list)  # tenant names
    removed: list[str] = field(default_factory=list)
    # tenant -> names of its workers whose instances are replaced
    replaced: dict[str, list[str]] = field(default_factory=dict)
    # tenant -> {worker: (old instances, new instances)}; 0 = worker added / removed
    scaled: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    resized: list[Resize] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    create: list[str] = field(default_factory=list)  # partition paths, parents first
    destroy: list[str] = field(default_factory=list)  # partition paths, deepest first
    not_applied: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (
            self.added
            or self.removed
            or self.replaced
            or self.scaled
            or self.resized
            or self.create
            or self.destroy
        )

    def restarted_names(self) -> list[str]:
        return [f"{t}:{w}" for t, workers in self.replaced.items() for w in workers]

    def summary(self) -> dict[str, Any]:
        """The diff as the ``reload`` reply and event carry it."""

        def group(names: list[str]) -> dict[str, Any]:
            return {"count": len(names), "names": names}

        resized = group([r.path for r in self.resized])
        resized["changes"] = {r.path: r.changes() for r in self.resized}
        return {
            "added": group(self.added),
            "removed": group(self.removed),
            "restarted": group(self.restarted_names()),
            "scaled": {
                f"{t}:{w}": list(counts)
                for t, ws in self.scaled.items()
                for w, counts in ws.items()
            },
            "resized": resized,
            "unchanged": group(self.unchanged),
            "partitions": {"created": list(self.create), "removed": list(self.destroy)},
            "not_applied": list(self.not_applied),
        }


def diff(
    live: Config, live_tree: PartitionTree, new: Config, new_tree: PartitionTree
) -> ConfigDiff:
    """Compare the running configuration (``live``, ``live_tree``) with ``new``."""
    out = ConfigDiff(not_applied=not_applied(live.daemon, new.daemon))
    old_tenants = {t.name: t for t in live.tenants}
    new_tenants = {t.name: t for t in new.tenants}

    moved = {
        name
        for name, spec in new_tenants.items()
        if name in old_tenants and old_tenants[name].path != spec.path
    }
    out.removed = [n for n in old_tenants if n not in new_tenants or n in moved]
    out.added = [n for n in new_tenants if n not in old_tenants or n in moved]

    # Partitions: a path that exists on both sides as the same kind (the same tenant,
    # or a group) is kept and maybe resized; anything else is removed and/or created.
    def kind(node: Partition) -> str | None:
        return node.tenant

    kept = [
        node
        for node in new_tree
        if node.path in live_tree
        and kind(live_tree[node.path]) == kind(node)
        and (node.tenant is None or node.tenant not in moved)
    ]
    kept_paths = {n.path for n in kept}
    out.create = [n.path for n in new_tree if n.path not in kept_paths]
    out.destroy = [n.path for n in live_tree.deepest_first() if n.path not in kept_paths]
    for node in kept:
        old_node = live_tree[node.path]
        old, now = Limits.of(old_node), Limits.of(node)
        flags = None
        if old_node.flags != node.flags:
            flags = (sorted(old_node.flags), sorted(node.flags))
        if old != now or flags is not None:
            out.resized.append(Resize(node.path, old, now, flags))
        out.not_applied += realtime_not_applied(old_node, node)

    resized_paths = {r.path for r in out.resized}
    for name, spec in new_tenants.items():
        if name in out.added:
            continue
        old_spec = old_tenants[name]
        replaced, scaled = worker_changes(old_spec, spec)
        if replaced:
            out.replaced[name] = replaced
        if scaled:
            out.scaled[name] = scaled
        if not replaced and not scaled and spec.path not in resized_paths:
            out.unchanged.append(name)
    return out


def _definition(worker: WorkerBase) -> dict[str, Any]:
    """Everything that makes a worker's process what it is: all of it but ``instances``."""
    return worker.model_dump(exclude={"instances"})


def worker_changes(
    old: TenantSpec, new: TenantSpec
) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """(workers to replace, {worker: (old instances, new instances)}) of a kept tenant.

    A changed restart policy or changed flags replace every worker: the policy lives in
    each instance's lifecycle, and flags (memory isolation) are applied at spawn."""
    everything = old.restart != new.restart or set(old.flags) != set(new.flags)
    # The tenant's real-time keys are every worker's defaults (docs/realtime.md).
    everything = everything or (old.sched, old.cpus, old.memlock) != (
        new.sched,
        new.cpus,
        new.memlock,
    )
    before = {w.name: w for w in old.worker}
    replaced: list[str] = []
    scaled: dict[str, tuple[int, int]] = {}
    for w in new.worker:
        was = before.get(w.name)
        if was is None:
            scaled[w.name] = (0, w.instances)
        elif everything or _definition(was) != _definition(w):
            replaced.append(w.name)
        elif was.instances != w.instances:
            scaled[w.name] = (was.instances, w.instances)
    kept = {w.name for w in new.worker}
    for name, was in before.items():
        if name not in kept:
            scaled[name] = (was.instances, 0)
    return replaced, scaled


def realtime_not_applied(old: Partition, new: Partition) -> list[str]:
    """A live partition's cpuset, critical budget or RT runtime are written when it is
    created; a reload does not rewrite them (docs/realtime.md): say so."""
    keys = ("cpuset", "critical_budget_ms", "critical_priority", "rt_runtime_us")
    changed = [k for k in keys if getattr(old, k) != getattr(new, k)]
    if not changed:
        return []
    return [
        f"partition '{new.path}': {', '.join(changed)} changed; takes effect when the "
        "partition is created again (daemon restart, or remove and re-add the tenant)"
    ]


def not_applied(old: DaemonSpec, new: DaemonSpec) -> list[str]:
    """``[daemon]`` settings that differ but only take effect when the daemon starts."""
    out = []
    for key in type(old).model_fields:
        if key in LIVE_DAEMON_KEYS:
            continue
        before, after = getattr(old, key), getattr(new, key)
        if before != after:
            out.append(
                f"daemon.{key}: {_show(before)} -> {_show(after)} takes effect at the next "
                f"daemon start (the running daemon keeps {_show(before)})"
            )
    return out


def keep_start_settings(old: DaemonSpec, new: DaemonSpec) -> DaemonSpec:
    """``new`` with every setting a reload cannot apply taken from ``old`` (what runs)."""
    keep = {k: getattr(old, k) for k in type(old).model_fields if k not in LIVE_DAEMON_KEYS}
    return new.model_copy(update=keep)


def _show(value: object) -> str:
    return str(value) if isinstance(value, int | float | bool) else repr(str(value))


def resize_steps(resizes: list[Resize], tree: PartitionTree) -> list[Step]:
    """The writes that take every partition in ``resizes`` from its old figures to its new
    ones, in an order no kernel refuses for hierarchy reasons: first each lowered to the
    per-figure tighter of old and new, deepest first; then each raised to its new
    figures, parents first (see ``Limits.tightest``). ``tree`` gives the depths."""
    by_path = {r.path: r for r in resizes}
    depth = {
        r.path: tree[r.path].depth if r.path in tree else r.path.count("/") + 1 for r in resizes
    }
    steps: list[Step] = []
    middle: dict[str, Limits] = {}
    for path in sorted(by_path, key=lambda p: (-depth[p], p)):
        r = by_path[path]
        tight = r.old.tightest(r.new)
        middle[path] = tight
        if tight != r.old:
            steps.append(Step(path, tight))
    for path in sorted(by_path, key=lambda p: (depth[p], p)):
        if by_path[path].new != middle[path]:
            steps.append(Step(path, by_path[path].new))
    return steps
