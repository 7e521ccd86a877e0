"""Changing a live system: reload (the files again, only the difference applied) and
``set`` (one partition's figures, until the next reload).

Both follow one rule: **validate everything, then change**. A reload reads every file
and admits the new tree exactly as at start-up (``load``, then the daemon's ``admit``:
the backend's own checks and the enforcement policy); a ``set`` admits a copy of the
live tree carrying the new figures. Any problem and nothing changes. Only then is the
difference (``config.diff``) applied, in an order that keeps every step valid:

1. instances that go (removed tenants, replaced or surplus workers) are stopped and
   their tasks end;
2. partitions that go are removed, deepest first;
3. partitions whose figures changed are resized in place (``resize_steps``: tightened
   deepest first, then raised parents first); a resize the kernel refuses is reported
   under ``failed`` and that partition keeps its previous figures (the new tree shows
   them, so ``partitions`` never claims what is not in force);
4. new partitions are created, parents first;
5. the daemon's config and tree are replaced in one step (``status``, ``partitions``
   and later spawns see the new ones), then new instances start: added tenants if
   ``autostart``, replacements of workers that were meant to run, added instances of
   a tenant that runs.

Reloads and sets take one lock, so they never interleave; shutdown takes it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol, TypeVar

import structlog
import trio

from supervisord_qnx import attached
from supervisord_qnx.config.diff import (
    ConfigDiff,
    diff,
    keep_start_settings,
    resize_steps,
)
from supervisord_qnx.config.load import ConfigError, Located, load
from supervisord_qnx.config.model import Config, TenantSpec
from supervisord_qnx.partition.backend import Backend, BackendError
from supervisord_qnx.partition.limits import Limits, Overrides, copy_tree, describe
from supervisord_qnx.partition.tree import PartitionTree
from supervisord_qnx.supervise.events import EventBus, LimitsSet, Reloaded
from supervisord_qnx.supervise.supervisor import Instance, NotFound, Supervisor

log = structlog.get_logger("supervisord_qnx.reload")

T = TypeVar("T")

# The daemon's start-up admission: the backend's checks and the enforcement policy.
Admit = Callable[[Config, Backend], tuple[PartitionTree, list[str]]]

SET_NOTE = "in force until the next reload (or daemon restart); the config files are unchanged"


class Host(Protocol):
    """What reload and ``set`` use of the daemon."""

    config: Config
    tree: PartitionTree
    backend: Backend
    supervisor: Supervisor
    events: EventBus
    created: list[str]
    attached: attached.Registry

    def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Awaitable[T]: ...


class Transient(Protocol):
    """Partitions made at runtime outside any file (transient jobs, ``run``). A reload
    leaves them out of its difference (they are in no file, yet not removed), carries
    them into the new tree, and first ends those inside a partition it removes."""

    def paths(self) -> list[str]: ...

    def rebind(self, tree: PartitionTree) -> None: ...

    async def end_under(self, paths: Collection[str]) -> None: ...


class LiveChanges:
    def __init__(self, host: Host, admit: Admit, transient: Transient | None = None) -> None:
        self.host = host
        self.admit = admit
        self.transient = transient
        self.lock = trio.Lock()
        self.overrides = Overrides()

    def _transient_paths(self) -> list[str]:
        return self.transient.paths() if self.transient is not None else []

    def _from_files(self, tree: PartitionTree) -> PartitionTree:
        """``tree`` without the transient partitions: what the files made of it."""
        paths = [p for p in self._transient_paths() if p in tree]
        if not paths:
            return tree
        out = copy_tree(tree)
        for path in paths:
            if path in out:
                out.remove(path)
        return out

    def _carry_transient(self, old: PartitionTree, new: PartitionTree) -> None:
        """Put the running jobs' partitions (figures as admitted) into ``new``."""
        for path in sorted(self._transient_paths(), key=lambda p: p.count("/")):
            if path not in old:
                continue
            node = old[path]
            if node.parent is None or node.parent.path not in new:
                continue
            new.add(dataclasses.replace(node, parent=None, children={}), node.parent.path)

    def _follow_transient(self, then: set[str], live: PartitionTree, copy: PartitionTree) -> None:
        """Make ``copy`` (taken from ``live`` when the jobs' partitions were ``then``)
        hold the jobs' partitions of now: drop those that ended, carry the new ones."""
        now = set(self._transient_paths())
        for path in sorted(then - now, key=lambda p: -p.count("/")):
            if path in copy:
                copy.remove(path)
        for path in sorted(now - then, key=lambda p: p.count("/")):
            if path not in live or path in copy:
                continue
            node = live[path]
            if node.parent is not None and node.parent.path in copy:
                copy.add(dataclasses.replace(node, parent=None, children={}), node.parent.path)

    # -- reload ---------------------------------------------------------------------

    async def reload(self, dry_run: bool = False) -> dict[str, Any]:
        """Read and admit every file; apply the difference (or, ``dry_run``, only say
        what it is). Raises ``ConfigError`` with every problem, having changed nothing."""
        async with self.lock:
            host = self.host
            try:
                new_config = await trio.to_thread.run_sync(load, host.config.path)
                new_tree, warnings = self.admit(new_config, host.backend)
            except ConfigError as exc:
                if not dry_run:
                    self._emit_reload(ConfigDiff(), ok=False, problems=exc.problems)
                raise
            plan = diff(host.config, self._from_files(host.tree), new_config, new_tree)
            for w in warnings:
                log.warning("unenforced control", detail=w)
            if dry_run:
                return self._reply(plan, [], self.overrides.paths(), dry_run=True)
            failed = await self._apply(plan, new_config, new_tree)
            failed_paths = {f["partition"] for f in failed}
            dropped = [p for p in self.overrides.paths() if p not in failed_paths]
            for path in dropped:
                self.overrides.drop(path)
            self._emit_reload(plan, ok=True, failed=failed, dropped=dropped)
            log.info("reloaded", **_log_fields(plan, failed))
            return self._reply(plan, failed, dropped, dry_run=False)

    def _reply(
        self, plan: ConfigDiff, failed: list[dict[str, str]], dropped: list[str], *, dry_run: bool
    ) -> dict[str, Any]:
        out = plan.summary()
        out.update({"failed": failed, "overrides_dropped": dropped, "dry_run": dry_run})
        return out

    def _emit_reload(
        self,
        plan: ConfigDiff,
        *,
        ok: bool,
        failed: list[dict[str, str]] | None = None,
        dropped: list[str] | None = None,
        problems: list[Located] | None = None,
    ) -> None:
        self.host.events.emit(
            Reloaded(
                ok=ok,
                added=list(plan.added),
                removed=list(plan.removed),
                restarted=plan.restarted_names(),
                resized=[r.path for r in plan.resized],
                unchanged=list(plan.unchanged),
                failed=failed or [],
                overrides_dropped=dropped or [],
                problems=[str(p) for p in problems or []],
            )
        )

    async def _apply(
        self, plan: ConfigDiff, new_config: Config, new_tree: PartitionTree
    ) -> list[dict[str, str]]:
        sup = self.host.supervisor
        going = _going(plan, sup)
        # Removed tenants stop in reverse `after` order (independent ones at once), as at
        # shutdown; then everything going is retired.
        await sup.stop_together(list(plan.removed))
        # From here until the replacements are asked to start, operators' start, stop and
        # restart wait: one landing on a retired instance (its task gone) hung for ever,
        # and the replacements would not follow it.
        sup.hold_operators()
        try:
            return await self._replace(plan, new_config, new_tree, going)
        finally:
            sup.release_operators()

    async def _replace(
        self,
        plan: ConfigDiff,
        new_config: Config,
        new_tree: PartitionTree,
        going: list[Instance],
    ) -> list[dict[str, str]]:
        host, sup = self.host, self.host.supervisor
        # Read before anything stops: which tenants and workers are meant to run.
        running = {n: any(i.lc.want_running for i in t.instances) for n, t in sup.tenants.items()}
        wanted = {
            (n, i.spec.name) for n, t in sup.tenants.items() for i in t.instances
            if i.lc.want_running
        }  # fmt: skip
        await sup.retire(going)  # 1.
        for name in plan.removed:
            del sup.tenants[name]
        if self.transient is not None:
            await self.transient.end_under(plan.destroy)
        failed = await self._remove_partitions(plan.destroy)  # 2.
        failed += await self._resize(plan, new_tree)  # 3.
        failed += await self._create_partitions(plan.create, new_tree)  # 4.
        # 5. The new config and tree in one step, then the new instances.
        config = new_config.model_copy(
            update={"daemon": keep_start_settings(host.config.daemon, new_config.daemon)}
        )
        self._carry_transient(host.tree, new_tree)
        host.config, host.tree = config, new_tree
        host.backend.adopt(new_tree)
        sup.rebind(config, new_tree)
        if self.transient is not None:
            self.transient.rebind(new_tree)
        new_specs = {t.name: t for t in new_config.tenants}
        gone = {id(i) for i in going}
        to_start: list[Instance] = []
        for name in plan.added:
            sup.add_tenant(new_specs[name])
        for name, tenant in sup.tenants.items():
            if name in plan.added:
                continue
            spec = new_specs[name]
            everyone, fresh = _rebuild(
                spec, [i for i in tenant.instances if id(i) not in gone], sup
            )
            tenant.spec, tenant.instances = spec, everyone
            for inst in fresh:
                inst.owner = tenant  # tenants after it hear of its changes
            replaced = plan.replaced.get(name, [])
            # A replaced worker runs again if it was meant to run; an added instance runs
            # if its tenant does.
            to_start += [
                i for i in fresh
                if ((name, i.spec.name) in wanted if i.spec.name in replaced else running[name])
            ]  # fmt: skip
        # Asked before operators may go again (a stop right after this reload wins).
        seqs = sup.start_intents(to_start)
        sup.release_operators()
        async with trio.open_nursery() as nursery:
            # Added tenants start as at boot: each after its `after` tenants.
            added = [name for name in plan.added if new_specs[name].autostart]
            if added:
                nursery.start_soon(sup.start_together, added)
            if to_start:
                nursery.start_soon(sup.settle_started, to_start, seqs)
        return failed

    async def _remove_partitions(self, paths: list[str]) -> list[dict[str, str]]:
        host, failed = self.host, []
        for path in paths:
            if path not in host.created:
                continue
            try:
                await host.blocking(self._give_back_attached, path)
                await host.blocking(host.backend.destroy, path)
            except Exception as exc:  # noqa: BLE001 - remove every other partition anyway
                log.error("could not remove partition", partition=path, error=str(exc))
                failed.append({"partition": path, "reason": f"removing: {exc}"})
            host.created.remove(path)
        return failed

    def _give_back_attached(self, top: str) -> None:
        """Processes an operator attached under ``top`` are not the tenant's: before the
        partition goes they are moved back where they were, alive, as at shutdown (those
        attached with ``own`` go with it)."""
        registry, backend = self.host.attached, self.host.backend
        for entry in list(registry.entries.values()):
            if entry.partition != top and not entry.partition.startswith(top + "/"):
                continue
            if not entry.own and entry.same_process():
                try:
                    backend.detach(entry.pid, entry.previous)
                    log.info("detached an attached process", pid=entry.pid, partition=top)
                except Exception as exc:  # noqa: BLE001 - give back every other pid anyway
                    log.error("could not detach an attached process", pid=entry.pid,
                              error=str(exc))  # fmt: skip
            registry.drop(entry.pid)

    async def _create_partitions(
        self, paths: list[str], tree: PartitionTree
    ) -> list[dict[str, str]]:
        host, failed = self.host, []
        for path in paths:
            try:
                await host.blocking(host.backend.create, tree[path])
            except BackendError as exc:
                # Its workers' spawns try to create it again (and fail naming why).
                log.error("could not create partition", partition=path, error=str(exc))
                failed.append({"partition": path, "reason": f"creating: {exc}"})
            # Listed either way: whatever part of it exists is removed at shutdown.
            host.created.append(path)
        return failed

    async def _resize(self, plan: ConfigDiff, new_tree: PartitionTree) -> list[dict[str, str]]:
        """Apply every resize step; a partition whose step fails is put back to its old
        figures (in the kernel and in ``new_tree``) and reported."""
        backend, failed = self.host.backend, []
        by_path = {r.path: r for r in plan.resized}
        broken: dict[str, str] = {}
        applied: set[str] = set()
        for step in resize_steps(plan.resized, new_tree):
            if step.path in broken:
                continue
            try:
                await self.host.blocking(backend.update_limits, step.limits.on(new_tree[step.path]))
                applied.add(step.path)
            except BackendError as exc:
                reason = str(exc)
                if step.path in applied:
                    # Its first (tightening) step went through: back to where it was.
                    old = by_path[step.path].old.on(new_tree[step.path])
                    try:
                        await self.host.blocking(backend.update_limits, old)
                    except BackendError as undo:
                        reason += f"; putting back its previous figures failed: {undo}"
                broken[step.path] = reason
        for path, reason in broken.items():
            log.error("resize refused; partition keeps its figures", partition=path, error=reason)
            by_path[path].old.apply(new_tree[path])
            failed.append({"partition": path, "reason": reason})
        return failed

    # -- set ------------------------------------------------------------------------

    async def set_limits(self, path: str, figures: dict[str, Any]) -> dict[str, Any]:
        """Change ``path``'s figures in place until the next reload (``systemctl
        set-property --runtime``). Admitted on a copy of the tree first: raises
        ``ConfigError`` (admission), ``NotFound`` or ``BackendError`` (the OS refused;
        the partition keeps its figures)."""
        async with self.lock:
            host = self.host
            if not path or path not in host.tree:
                known = ", ".join(n.path for n in host.tree) or "none"
                raise NotFound(f"no partition {path!r} (known: {known})")
            copy = copy_tree(host.tree)
            jobs_then = set(self._transient_paths())
            node = copy[path]
            old = Limits.of(node)
            for attr, value in figures.items():
                setattr(node, attr, value)
            new = Limits.of(node)
            config = host.config.model_copy(update={"tree": copy})
            # Jobs were admitted by their own rules when they started (a job's partition
            # is a leaf, like a worker's): the files' partitions are what `set` checks.
            self._admit_one(config, self._from_files(copy), path)
            if new != old:
                await host.blocking(host.backend.update_limits, new.on(node))
            # Jobs started or ended while the backend was written to changed the live
            # tree, not the copy: follow them, or the copy loses a new job's partition
            # (its task then fails) or keeps an ended one's.
            self._follow_transient(jobs_then, host.tree, copy)
            host.config, host.tree = config, copy
            host.backend.adopt(copy)
            host.supervisor.rebind(config, copy)
            if self.transient is not None:
                self.transient.rebind(copy)
            self.overrides.record(path, figures)
            changes = old.changes(new)
            host.events.emit(LimitsSet(path, changes))
            log.info("limits set", partition=path,
                     **{k: f"{describe_wire(k, a)} -> {describe_wire(k, b)}"
                        for k, (a, b) in changes.items()})  # fmt: skip
            return {
                "partition": path,
                "changes": changes,
                "limits": node.limits(),
                "override": self.overrides.get(path),
                "note": SET_NOTE,
            }

    def _admit_one(self, config: Config, tree: PartitionTree, path: str) -> None:
        """The admission rules that concern ``path``: its own, its parent's sums over its
        siblings, and its children's bounds; then the backend's checks as at start-up."""
        parent = path.rpartition("/")[0]
        # Named after the partition, not a file: the files are not what is wrong.
        problems = [
            Located(f"partition '{p.partition}'", p.key, p.reason)
            for p in tree.admit()
            if p.partition in (path, parent) or p.partition.startswith(path + "/")
        ]
        try:
            self.admit(config, self.host.backend)
        except ConfigError as exc:
            problems += exc.problems
        if problems:
            raise ConfigError(problems)


def _going(plan: ConfigDiff, sup: Supervisor) -> list[Instance]:
    """Instances a reload stops for good: of removed tenants, of replaced workers, and
    those beyond a worker's new ``instances``."""
    going: list[Instance] = []
    for name in plan.removed:
        going += sup.tenants[name].instances
    for name, workers in plan.replaced.items():
        going += [i for i in sup.tenants[name].instances if i.spec.name in workers]
    for name, scaled in plan.scaled.items():
        going += [
            i for i in sup.tenants[name].instances
            if i.spec.name in scaled and i.index >= scaled[i.spec.name][1]
        ]  # fmt: skip
    return going


def _rebuild(
    new: TenantSpec, kept: list[Instance], sup: Supervisor
) -> tuple[list[Instance], list[Instance]]:
    """A kept tenant's instances in config order: the kept ones (given the new worker
    definition, equal but for ``instances``) and new ones; returns (all, new)."""
    count = sum(w.instances for w in new.worker)
    by_worker: dict[str, list[Instance]] = {}
    for inst in kept:
        by_worker.setdefault(inst.spec.name, []).append(inst)
    out: list[Instance] = []
    fresh: list[Instance] = []
    for w in new.worker:
        have = by_worker.get(w.name, [])
        for inst in have:
            inst.spec = w
            inst.target.spec = w
            inst.target.instances = count
        indices = {i.index for i in have}
        made = [
            m for i in range(w.instances) if i not in indices
            for m in sup.new_instances(new, w, range(i, i + 1))
        ]  # fmt: skip
        fresh += made
        out += sorted(have + made, key=lambda i: i.index)
    return out, fresh


def describe_wire(wire: str, value: Any) -> str:
    from supervisord_qnx.partition.limits import WIRE_TO_FIGURE

    return describe(WIRE_TO_FIGURE[wire], value)


def _log_fields(plan: ConfigDiff, failed: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "added": plan.added,
        "removed": plan.removed,
        "restarted": plan.restarted_names(),
        "resized": [r.path for r in plan.resized],
        "unchanged": len(plan.unchanged),
        "failed": [f["partition"] for f in failed],
    }
