"""The supervisor: one task per worker instance performing what its ``Lifecycle``
(``worker.py``) decides, spawning through the backend.

Ownership (structured concurrency): the supervisor's nursery owns one task per
instance for the daemon's whole life, and an exit watcher per process. Operator
calls never change a state themselves: they tell the instance's ``Lifecycle``
what the operator wants, wake its task, and wait for the state that answers
them. The task is the only one that feeds the lifecycle facts (spawned, exited,
timer) and the only one that performs actions (spawn, signal, clear the leaf),
so one worker is never driven by two tasks. Each task is a failure boundary:
an exception in it makes that worker ``fatal``, never the daemon exit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from supervisord_qnx.config.model import Config, TenantSpec, WorkerBase
from supervisord_qnx.config.ordering import Ordering
from supervisord_qnx.config.realtime import effective as realtime_settings
from supervisord_qnx.exits import ExitKind, ExitReason
from supervisord_qnx.partition.backend import Backend, BackendError, BackendEvent, SpawnRequest
from supervisord_qnx.partition.process import ProcessSettings
from supervisord_qnx.partition.tree import PartitionTree
from supervisord_qnx.supervise import confine, leftovers, logpipe, spawnthreads
from supervisord_qnx.supervise.events import (
    BackendWatchFailed,
    EventBus,
    PartitionCondition,
    PartitionRecreated,
    StartBlocked,
    StateChanged,
    WorkerFatal,
    WorkerRestarting,
)
from supervisord_qnx.supervise.launch import Launcher, Launchers, LaunchTarget
from supervisord_qnx.supervise.notify import Notification, NotifyDir, NotifyEndpoint
from supervisord_qnx.supervise.ordering import (
    AfterFailed,
    Readiness,
    readiness,
    stop_in_reverse,
    wait_for_after,
)
from supervisord_qnx.supervise.reaper import ChildReaper, describe_status, signal_group
from supervisord_qnx.supervise.shutdown import BulkShutdown
from supervisord_qnx.supervise.worker import (
    SETTLED_AFTER_START,
    SETTLED_AFTER_STOP,
    Action,
    Lifecycle,
    State,
)

log = structlog.get_logger("supervisord_qnx.supervisor")


class NotFound(Exception):
    pass


# What an adopted run that was not our child ended with, when the backend cannot tell.
UNKNOWN_EXIT = ExitReason(ExitKind.EXIT, "unknown")
# Waits for an adopted run's end; its wait status when it was our child, else None.
GoneWaiter = Callable[[], Awaitable[int | None]]


def _nothing() -> None:
    return None


@dataclass(eq=False)
class Run:
    """One process of an instance: what the exit watcher fills in when it ends."""

    pid: int
    status: int | None = None  # the wait status, once the process ended
    failure: Exception | None = None  # waiting for it failed (raised in the task)
    # False for a previous daemon's run adopted while not our child: no wait status
    # comes; its end is told by its pidfd (supervise/adopt.py), its reason by the backend.
    known: bool = True


@dataclass(eq=False)
class Instance:
    """One copy of a worker (``instances = 3`` gives three) and the task state around
    its ``Lifecycle``: the current process, the wake-up event, its launch target."""

    tenant: str
    partition: str
    spec: WorkerBase
    index: int
    lc: Lifecycle
    target: LaunchTarget
    run: Run | None = None
    # Set whenever something the performing task must look at happened (an operator
    # call, an exit); replaced by the task each time it goes to sleep.
    wake: trio.Event = field(default_factory=trio.Event)
    # Set and replaced on every state change and after every step of the task, for
    # callers waiting for a state whose actions have been performed.
    changed: trio.Event = field(default_factory=trio.Event)
    performing: bool = False
    failures_in_a_row: int = 0
    # Set (by a reload removing it) once it is stopped for good: its task then ends.
    retired: bool = False
    owner: Tenant | None = None  # told of every change, for tenants ordered after it
    notify: NotifyEndpoint | None = None  # its NOTIFY_SOCKET (ready = "notify", watchdog)
    # The log writer serving this instance's runs until it stops (supervise/logpipe.py).
    log_writer: logpipe.Writer | None = None
    # For the runtime state (supervise/state.py): the current run's and the log writer's
    # start times (/proc/PID/stat field 22), which make their pids unambiguous later.
    ticks: int | str | None = None
    writer_ticks: int | str | None = None
    # Its leaf read empty after the last run ended, and nothing was spawned into it
    # since: the lifecycle's clear-leaf has nothing to kill (no thread hop).
    leaf_empty: bool = False

    @property
    def leaf(self) -> str:
        return f"{self.spec.name}-{self.index}"

    @property
    def name(self) -> str:
        return f"{self.tenant}:{self.leaf}"

    @property
    def state(self) -> State:
        return self.lc.state

    def settled_in(self, states: frozenset[State]) -> bool:
        """In one of ``states`` with that state's actions done (a stopped worker's leaf
        is empty and released before ``stop`` answers)."""
        return self.lc.state in states and not self.lc.has_actions and not self.performing

    def progressed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        if self.owner is not None:
            self.owner.progressed()

    def as_dict(self, extra: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        out: dict[str, Any] = {key: get(self, now) for key, get in OWN_FIELDS.items()}
        out.update(extra)
        return out


def _uptime(inst: Instance, now: float) -> float | None:
    lc = inst.lc
    if lc.started_at is None or lc.state is not State.RUNNING:
        return None
    return round(now - lc.started_at, 3)


# The fields of a status row that an instance holds itself, in the row's order
# (docs/protocol.md), each read from the instance and the time of the reply. One table
# for the whole row (``as_dict``) and for ``status`` asked for some fields only
# (control/statusrows.py), which reads just those.
OWN_FIELDS: dict[str, Callable[[Instance, float], Any]] = {
    "tenant": lambda i, _: i.tenant,
    "worker": lambda i, _: i.spec.name,
    "instance": lambda i, _: i.index,
    "name": lambda i, _: i.name,
    "kind": lambda i, _: getattr(i.spec, "kind", "command"),
    "state": lambda i, _: str(i.lc.state),
    "pid": lambda i, _: i.lc.pid,
    "partition": lambda i, _: i.partition,
    "restarts": lambda i, _: i.lc.restarts,
    "exit_reason": lambda i, _: None if i.lc.exit_reason is None else str(i.lc.exit_reason),
    "uptime": _uptime,
}


@dataclass(eq=False)
class Tenant:
    spec: TenantSpec
    instances: list[Instance]
    start_order: int = 0
    # Starts of this tenant still waiting for its `after` tenants (supervise/ordering.py).
    starting: int = 0
    # Operator calls so far: a start that waited for its `after` tenants goes ahead only
    # if no later call (a stop) overruled it meanwhile.
    calls: int = 0
    # Why the last start was given up (its `after` tenant did not come up), until the next.
    blocked: str | None = None
    # Set and replaced whenever one of its instances changes, for the tenants after it.
    changed: trio.Event = field(default_factory=trio.Event)
    # The operator's last word on it ("started", "stopped" or None): kept in the runtime
    # state, so a tenant stopped by hand stays stopped when the daemon starts again.
    operator: str | None = None

    def __post_init__(self) -> None:
        for inst in self.instances:
            inst.owner = self

    def progressed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


# Spawn errors that say "not now" rather than "never": the restart policy retries them.
TRANSIENT_SPAWN_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})
# After this many failures in a row without a clean step, an instance's task stops
# retrying its queued actions and sleeps until the operator calls again.
MAX_FAILURES_IN_A_ROW = 3
# How long an exit waits for the worker's log writer to write its last lines.
LOG_DRAIN_WAIT = 1.0
# No run follows these without an operator's call: the log writer is let go.
STOPPED_FOR_GOOD = frozenset({State.STOPPED, State.EXITED, State.FATAL})


class Supervisor:
    def __init__(
        self,
        config: Config,
        tree: PartitionTree,
        backend: Backend,
        reaper: ChildReaper,
        events: EventBus,
    ) -> None:
        self.config = config
        self.tree = tree
        self.backend = backend
        self.reaper = reaper
        self.events = events
        self.log_dir = Path(config.daemon.log_dir)
        self.state_dir = Path(config.daemon.state_dir)
        self.tenants: dict[str, Tenant] = {}
        # Set while a reload replaces instances (hold_operators): operator calls wait, so
        # that none lands on an instance that is going (its task is gone) and each
        # applies to the instances that stay.
        self._reconfiguring: trio.Event | None = None
        self._order = 0
        self._nursery: trio.Nursery | None = None
        self.launchers = Launchers(backend, reaper, tree, config.daemon)
        # Replaced at every rebind (reload): the backend watch waits on it to start again.
        self.tree_changed = trio.Event()
        self.ordering = Ordering({t.name: t.after for t in config.tenants})
        self.notify_dir = NotifyDir(self.state_dir)
        # In every worker's environment: names this daemon's workers after its death
        # (supervise/leftovers.py).
        self.owner = leftovers.owner_value(self.state_dir)
        backend.set_owner(self.owner)  # tag-accounting backends count only our processes
        # Workers adopted from a previous daemon at this one's start (metrics).
        self.adopted = 0
        # Told of every state change and operator call (the runtime state's writer).
        self.on_change: Callable[[], None] = _nothing
        # Begun by the daemon's shutdown: stopped workers leave their leaves to the
        # partitions' removal (supervise/shutdown.py).
        self.shutdown = BulkShutdown(lambda name: self.ordering.after(name))
        for spec in config.tenants:
            count = sum(w.instances for w in spec.worker)
            self.tenants[spec.name] = Tenant(
                spec,
                [
                    Instance(
                        spec.name,
                        spec.path,
                        w,
                        i,
                        Lifecycle.for_worker(spec.restart, w),
                        LaunchTarget(spec.name, spec.path, w, i, count),
                    )
                    for w in spec.worker
                    for i in range(w.instances)
                ],
            )

    def _launcher(self, inst: Instance) -> Launcher:
        return self.launchers.for_spec(inst.spec)

    def _describe(self, inst: Instance) -> dict[str, Any]:
        extra = self._launcher(inst).status_fields(inst.target)
        note = inst.notify
        extra["status_text"] = None if note is None else note.status_text
        if note is not None:
            extra.update(note.fields())
        return inst.as_dict(extra)

    # -- lifecycle of the whole supervisor -------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own every instance's task; returns only when cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.launchers.bind(nursery)
                for tenant in self.tenants.values():
                    for inst in tenant.instances:
                        nursery.start_soon(self._run_instance, inst)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.launchers.kill()
            self.notify_dir.close()
            for tenant in self.tenants.values():
                for inst in tenant.instances:
                    self._release_log(inst)

    async def _run_instance(self, inst: Instance) -> None:
        """The instance's task (``_drive``), beside its NOTIFY_SOCKET receiver when it
        has one (``ready = "notify"`` or a ``watchdog``); the socket lives as long."""
        if not inst.spec.uses_notify:
            await self._drive(inst)
            return
        try:
            inst.notify = self.notify_dir.endpoint()
        except OSError as exc:
            # Its spawns fail (spawn-failed, in _env) and say why; the daemon goes on.
            log.error("cannot create a worker's notify socket", worker=inst.name, error=str(exc))
            await self._drive(inst)
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_notify, inst, inst.notify)
                await self._drive(inst)
                # Retired by a reload: its receiver and socket go with it.
                nursery.cancel_scope.cancel()
        finally:
            inst.notify.close()

    async def start_autostart(self) -> None:
        """Start every autostart tenant; wait until each settled (or was given up)."""
        await self.start_together(
            [
                t.spec.name
                for t in self.tenants.values()
                if ((t.spec.autostart and t.operator != "stopped") or t.operator == "started")
                # Adopted, or waiting out a previous daemon's backoff: already on its way.
                and not all(i.lc.want_running for i in t.instances)
            ]
        )

    async def start_together(self, names: list[str]) -> None:
        """Start ``names`` at once, each after the tenants it is ``after`` (all of ``names``
        count as on their way up from the first moment); wait until each settled. A
        tenant whose ``after`` tenant did not come up stays stopped (``start-blocked``)."""
        tenants = [self.tenant(name) for name in names]
        for tenant in tenants:
            tenant.starting += 1

        async def start_one(tenant: Tenant) -> None:
            try:
                await self._start(tenant, wait=True)
            except AfterFailed:
                pass  # reported by _start (event and log)
            except Exception:  # one tenant's failure boundary
                log.exception("starting a tenant failed; carrying on", tenant=tenant.spec.name)

        async with trio.open_nursery() as nursery:
            for tenant in tenants:
                nursery.start_soon(start_one, tenant)

    async def stop_all(self) -> None:
        """Stop every tenant: each once the tenants ``after`` it are stopped, all others at
        the same time (supervise/ordering.py). Carries on past a tenant whose stop fails."""
        await self.stop_together(list(self.tenants))

    async def stop_together(self, names: list[str]) -> None:
        """Stop ``names`` (shutdown, or tenants a reload removes) in reverse ``after``
        order, concurrently where they are not ordered; wait until each is stopped."""
        for name in names:
            self.tenant(name)  # unknown names fail here, before anything is stopped
        await stop_in_reverse(
            self.ordering, names, lambda name: self.stop(name, wait=True, operator=False)
        )

    # -- operator commands ---------------------------------------------------------
    #
    # They only change an instance's intent (through its Lifecycle) and wake its task;
    # then they wait, if asked, for the state that answers them or for a later call
    # that overrules them. Nothing here performs an action.

    def tenant(self, name: str) -> Tenant:
        try:
            return self.tenants[name]
        except KeyError:
            known = ", ".join(sorted(self.tenants)) or "none"
            raise NotFound(f"no tenant named {name!r} (known: {known})") from None

    async def start(self, name: str, wait: bool = False) -> list[dict[str, Any]]:
        """Start a tenant once the tenants it is ``after`` that are on their way up run;
        raises ``AfterFailed`` (and leaves it stopped) if one of them did not come up."""
        tenant = self.tenant(name)
        tenant.starting += 1
        tenant.operator = "started"
        return await self._start(tenant, wait)

    async def _start(self, tenant: Tenant, wait: bool) -> list[dict[str, Any]]:
        # The caller counted this start in `tenant.starting`: until the intents are set
        # (or the start is given up), tenants after this one see it on its way up.
        tenant.calls += 1
        call = tenant.calls
        try:
            after = self.ordering.after(tenant.spec.name)
            # Only a start that starts something waits: one of a tenant already up (or
            # coming back by itself) changes nothing, so it has nothing to order.
            if after and not all(i.lc.want_running for i in tenant.instances):
                try:
                    await wait_for_after(
                        tenant.spec.name, after, self._readiness, self._tenant_changed
                    )
                except AfterFailed as exc:
                    if tenant.calls != call:  # overruled meanwhile: nothing to report
                        return [self._describe(i) for i in tenant.instances]
                    tenant.blocked = f"it starts after {exc.after!r}, which did not come up"
                    tenant.blocked += f" ({exc.why})"
                    self.events.emit(StartBlocked(tenant.spec.name, exc.after, exc.why))
                    raise
            await self._operators_may_go()  # no checkpoint after it until the intents
            if tenant.calls != call:  # a later call overruled this start while it waited
                return [self._describe(i) for i in tenant.instances]
            tenant.blocked = None
            self._order += 1
            tenant.start_order = self._order
            seqs = [self._call(inst, inst.lc.start) for inst in tenant.instances]
        finally:
            tenant.starting -= 1
            tenant.progressed()
        if wait:
            await self._answer(tenant, seqs, SETTLED_AFTER_START)
        return [self._describe(i) for i in tenant.instances]

    def _readiness(self, name: str) -> tuple[Readiness, str]:
        tenant = self.tenants[name]
        state, why = readiness(tenant.starting > 0, tenant.instances)
        if state is Readiness.DOWN and tenant.blocked is not None:
            why = f"not started: {tenant.blocked}"
        return state, why

    def _tenant_changed(self, name: str) -> trio.Event:
        return self.tenants[name].changed

    async def stop(
        self, name: str, wait: bool = True, *, operator: bool = True
    ) -> list[dict[str, Any]]:
        await self._operators_may_go()
        tenant = self.tenant(name)
        tenant.calls += 1
        if operator:  # not the daemon's own shutdown: that stop is not a decision to keep
            tenant.operator = "stopped"
        seqs = [self._call(inst, inst.lc.stop) for inst in tenant.instances]
        if wait:
            await self._answer(tenant, seqs, SETTLED_AFTER_STOP)
        else:
            await trio.lowlevel.checkpoint()
        return [self._describe(i) for i in tenant.instances]

    async def restart(self, name: str, wait: bool = False) -> list[dict[str, Any]]:
        """Stop the current runs, then start again; returns once the old runs are gone
        (and, with ``wait``, once the new ones settled)."""
        await self._operators_may_go()
        tenant = self.tenant(name)
        tenant.calls += 1
        tenant.operator = "started"
        self._order += 1
        tenant.start_order = self._order
        seqs = [self._call(inst, inst.lc.restart) for inst in tenant.instances]
        not_stopping = frozenset(State) - {State.STOPPING}
        await self._answer(tenant, seqs, SETTLED_AFTER_START if wait else not_stopping)
        return [self._describe(i) for i in tenant.instances]

    def hold_operators(self) -> None:
        """A reload is about to retire and replace instances: start, stop and restart
        wait until ``release_operators`` (the reload's own calls do not go through them)."""
        self._reconfiguring = trio.Event()

    def release_operators(self) -> None:
        if self._reconfiguring is not None:
            self._reconfiguring.set()
            self._reconfiguring = None

    async def _operators_may_go(self) -> None:
        while self._reconfiguring is not None:
            await self._reconfiguring.wait()

    def _call(self, inst: Instance, call: Callable[[float], None]) -> int:
        before = inst.lc.state
        call(time.monotonic())
        self._changed(inst, before)
        self.on_change()
        inst.wake.set()
        return inst.lc.intent_seq

    async def _answer(self, tenant: Tenant, seqs: list[int], states: frozenset[State]) -> None:
        await self._answer_for(tenant.instances, seqs, states)

    async def _answer_for(
        self, instances: list[Instance], seqs: list[int], states: frozenset[State]
    ) -> None:
        for inst, seq in zip(instances, seqs, strict=True):
            while not inst.settled_in(states) and inst.lc.intent_seq == seq:
                await inst.changed.wait()

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        tenants = [self.tenant(name)] if name is not None else list(self.tenants.values())
        return [self._describe(i) for t in tenants for i in t.instances]

    def log_path(self, inst: Instance) -> Path:
        return logpipe.log_path(self.log_dir, inst.tenant, inst.leaf)

    def log_settings(self, inst: Instance) -> logpipe.LogSettings:
        return logpipe.settings_for(self.config.daemon, self.tenant(inst.tenant).spec, inst.spec)

    def find_instances(self, tenant: str, worker: str | None = None) -> list[Instance]:
        t = self.tenant(tenant)
        found = [i for i in t.instances if worker in (None, i.spec.name, i.leaf)]
        if not found:
            raise NotFound(f"tenant {tenant!r} has no worker {worker!r}")
        return found

    async def watch_backend(self) -> None:
        """Run the backend's event source for the daemon's life. A failure boundary: if
        it fails (a notification fd gone bad, a sampling error), pressure and OOM events
        pause for a second while it starts again; supervision itself never depends on it."""
        while True:
            try:
                await self.backend.watch(self.tree, self.on_backend_event)
                # Nothing to watch in this tree; a reload may bring something.
                await self.tree_changed.wait()
                continue
            except Exception as exc:  # noqa: BLE001 - the failure boundary of the watcher
                log.error("backend event watch failed; restarting it", error=repr(exc))
                self.events.emit(BackendWatchFailed(f"{type(exc).__name__}: {exc}"))
            await trio.sleep(1.0)

    def on_backend_event(self, event: BackendEvent) -> None:
        self.events.emit(
            PartitionCondition(str(event.kind), event.partition, event.leaf, event.detail)
        )

    # -- runtime changes (reload; supervise/reload.py decides what) -----------------

    def rebind(self, config: Config, tree: PartitionTree) -> None:
        """Work from a reloaded config and tree from now on (what later spawns see)."""
        self.config, self.tree = config, tree
        self.launchers.wasm.tree = tree
        self.ordering = Ordering({t.name: t.after for t in config.tenants})
        self.tree_changed.set()
        self.tree_changed = trio.Event()

    def new_instances(self, spec: TenantSpec, worker: WorkerBase, indices: range) -> list[Instance]:
        """Instances of ``worker`` of tenant ``spec``, each with its performing task."""
        count = sum(w.instances for w in spec.worker)
        made = [
            Instance(
                spec.name,
                spec.path,
                worker,
                i,
                Lifecycle.for_worker(spec.restart, worker),
                LaunchTarget(spec.name, spec.path, worker, i, count),
            )
            for i in indices
        ]
        assert self._nursery is not None
        for inst in made:
            # With its NOTIFY_SOCKET when the worker uses one, as at start-up.
            self._nursery.start_soon(self._run_instance, inst)
        return made

    def add_tenant(self, spec: TenantSpec) -> Tenant:
        """A tenant a reload added (stopped; ``start`` it as for any other)."""
        tenant = Tenant(spec, [i for w in spec.worker for i in self.new_instances(
            spec, w, range(w.instances))])  # fmt: skip
        self.tenants[spec.name] = tenant
        return tenant

    async def retire(self, instances: list[Instance]) -> None:
        """Stop ``instances`` for good: stopped, their leaves emptied and released, their
        tasks ended. An operator's ``start`` meanwhile is overruled: they are going."""
        pending = instances
        while pending:
            seqs = [self._call(i, i.lc.stop) for i in pending]
            await self._answer_for(pending, seqs, SETTLED_AFTER_STOP)
            pending = [
                i for i in instances if i.lc.want_running or not i.settled_in(SETTLED_AFTER_STOP)
            ]
        for inst in instances:
            # Only now: a task that saw "retired" while its process ran would leave it.
            inst.retired = True
            inst.wake.set()  # its task sees it retired and idle, and returns

    async def start_instances(self, instances: list[Instance]) -> None:
        """Start these instances and wait until each settled (a reload's replacements)."""
        await self.settle_started(instances, self.start_intents(instances))

    def start_intents(self, instances: list[Instance]) -> list[int]:
        """Ask these instances to start (no wait); the intents' numbers for the wait."""
        return [self._call(inst, inst.lc.start) for inst in instances]

    async def settle_started(self, instances: list[Instance], seqs: list[int]) -> None:
        await self._answer_for(instances, seqs, SETTLED_AFTER_START)

    # -- one instance: the task that performs its lifecycle's actions ---------------

    def _changed(self, inst: Instance, before: State) -> None:
        """Tell waiters and the event log about a state change the lifecycle made."""
        lc = inst.lc
        if lc.state is before:
            return
        self.on_change()
        inst.progressed()
        reason = None if lc.exit_reason is None else str(lc.exit_reason)
        self.events.emit(StateChanged(inst.name, str(before), str(lc.state), lc.pid, reason))
        if lc.state is State.FATAL:
            self.events.emit(WorkerFatal(inst.name, reason, lc.restarts, lc.policy.window))

    def _feed(self, inst: Instance, fact: Callable[[], None]) -> None:
        before = inst.lc.state
        fact()
        self._changed(inst, before)

    async def _serve_notify(self, inst: Instance, endpoint: NotifyEndpoint) -> None:
        """Feed the instance's lifecycle what its processes say on its NOTIFY_SOCKET
        (supervise/notify.py): only messages from a pid in its partition leaf count."""

        async def member(pid: int) -> bool:
            if pid == inst.lc.pid:
                return True
            try:
                leaf = await trio.to_thread.run_sync(self.backend.pids, inst.partition, inst.leaf)
            except BackendError:
                return False  # its leaf is gone (removed from outside): nobody is in it
            return pid in leaf

        def deliver(note: Notification) -> None:
            now = time.monotonic()
            if note.ready:
                self._feed(inst, lambda: inst.lc.ready(now))
                inst.wake.set()  # its timer changed (start timeout off, watchdog on)
            if note.watchdog:
                inst.lc.watchdog_ping(now)

        while True:
            try:
                await endpoint.serve(member, deliver, inst.name)
            except Exception as exc:  # the failure boundary of the receiver
                # The worker's task must not go down with it: it only stops hearing
                # from the worker for a second (a watchdog may fire meanwhile).
                log.error("notify receiver failed; restarting it", worker=inst.name, exc_info=exc)
            await trio.sleep(1.0)

    def _has_work(self, inst: Instance) -> bool:
        run = inst.run
        return (
            (run is not None and (run.status is not None or run.failure is not None))
            or inst.lc.has_actions
            or inst.lc.timer_due(time.monotonic())
        )

    async def _drive(self, inst: Instance) -> None:
        """The one task that changes this instance: it turns exits and timers into
        lifecycle facts and performs the actions the lifecycle answers with.

        It is a failure boundary: whatever escapes a step makes this worker ``fatal``
        (``internal: …``), is logged once with its traceback, and the task goes on
        serving operator calls. The daemon and every other worker carry on."""
        while True:
            if inst.retired and not self._has_work(inst):
                self._release_log(inst)  # removed by a reload: its writer may end
                return
            if not self._has_work(inst):
                inst.wake = trio.Event()
                # The lifecycle's clock is time.monotonic(); trio's has its own offset.
                deadline = inst.lc.deadline
                if deadline is None:
                    # No timer: no cancel scope either (with its status, about 0.6 KiB
                    # per waiting worker, configured or running: issue 14, daemon RSS).
                    await inst.wake.wait()
                    continue
                with trio.move_on_after(max(0.0, deadline - time.monotonic())):
                    await inst.wake.wait()
                continue
            inst.performing = True
            try:
                await self._step(inst)
                inst.failures_in_a_row = 0
            except Exception as exc:  # noqa: BLE001 - the failure boundary of one worker
                self._internal_failure(inst, exc)
            finally:
                inst.performing = False
                inst.progressed()
            if inst.settled_in(STOPPED_FOR_GOOD) and inst.run is None:
                self._release_log(inst)

    def _release_log(self, inst: Instance) -> None:
        """The instance will not run again by itself: let its log writer finish."""
        if inst.log_writer is not None:
            inst.log_writer.close()
            self.shutdown.writer_closed(inst.log_writer.pid)
            inst.log_writer = None

    async def _step(self, inst: Instance) -> None:
        lc, run = inst.lc, inst.run
        if run is not None and run.failure is not None:
            inst.run = None
            raise run.failure
        if run is not None and run.status is not None:
            inst.run = None
            if lc.pid == run.pid:  # not a run the lifecycle already gave up on
                # An exit is reported once the run's last lines are in its files (what
                # `logs` shows then is complete); at the shutdown, before the daemon
                # exits (supervise/shutdown.py).
                # The exit reason is found while the writer reads the run's last lines.
                status = run.status
                reason = await logpipe.end_run_beside(
                    None if self.shutdown.ends_log_at_eof(lc.want_running) else inst.log_writer,
                    LOG_DRAIN_WAIT,
                    (lambda: self._exit_reason(inst, status))
                    if run.known
                    else (lambda: self._unknown_exit_reason(inst)),
                )
                now = time.monotonic()
                self._feed(inst, lambda: lc.exited(reason, now))
            return
        now = time.monotonic()
        if lc.timer_due(now):
            waited = lc.state is State.BACKOFF  # not a start timeout or the watchdog
            self._feed(inst, lambda: lc.timer(now))
            if waited and lc.state is State.STARTING:
                self.events.emit(WorkerRestarting(inst.name, lc.backoff_delay))
            return
        action = lc.next_action()
        if action is not None:
            await self._perform(inst, action, run)

    def _internal_failure(self, inst: Instance, exc: BaseException) -> None:
        inst.failures_in_a_row += 1
        summary = f"{type(exc).__name__}: {exc}"
        log.error("worker task failed", worker=inst.name, error=summary, exc_info=exc)
        reason = (
            ExitReason(ExitKind.BACKEND, str(exc))
            if isinstance(exc, BackendError)
            else ExitReason(ExitKind.INTERNAL, summary)
        )
        self._feed(inst, lambda: inst.lc.fail(reason, time.monotonic()))
        if inst.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            # Its own clean-up keeps failing: stop trying until an operator calls.
            while inst.lc.next_action() is not None:
                pass

    async def _perform(self, inst: Instance, action: Action, run: Run | None) -> None:
        if action is Action.SPAWN:
            await self._start_run(inst)
        elif action is Action.SIGNAL:
            if run is not None and run.status is None:
                signal_group(run.pid, inst.spec.stop_signal)
        elif action is Action.KILL:
            if run is not None and run.status is None:
                signal_group(run.pid, signal.SIGKILL)
        elif action in (Action.CLEAR_LEAF, Action.RELEASE_LEAF) and self._left_to_shutdown(inst):
            return  # the partition's removal kills what is left and removes the leaf
        elif action is Action.CLEAR_LEAF and inst.leaf_empty:
            inst.leaf_empty = False  # seen empty after the exit: nothing can be in it
        elif action is Action.CLEAR_LEAF:
            await self._with_partition(inst, lambda: self._clear_leaf(inst))
        elif action is Action.RELEASE_LEAF:
            await self._with_partition(
                inst,
                lambda: trio.to_thread.run_sync(
                    self.backend.release_leaf, inst.partition, inst.leaf
                ),
            )

    async def _with_partition(self, inst: Instance, op: Callable[[], Awaitable[object]]) -> None:
        """Run a backend operation for this worker; if it fails because the partition
        vanished (removed from outside), re-create the partition from the tree and try
        once more. A second failure escapes to the boundary: ``fatal``, ``backend: …``."""
        try:
            await op()
        except BackendError as exc:
            if not await self._recreate_partition(inst, exc):
                raise
            await op()

    async def _recreate_partition(self, inst: Instance, cause: BackendError) -> bool:
        node = self.tree[inst.partition]
        chain = [*reversed(list(node.ancestors())), *self.tree.deepest_first(node.path)[::-1]]
        chain = [n for n in chain if n.path]  # the root is the backend's own, never re-made
        recreated = await trio.to_thread.run_sync(self.backend.recreate, chain)
        if recreated:
            log.warning("partition re-created", partition=inst.partition, cause=str(cause))
            self.events.emit(PartitionRecreated(inst.partition, inst.name, str(cause)))
        return recreated

    async def _start_run(self, inst: Instance) -> None:
        lc = inst.lc
        inst.leaf_empty = False  # a process of this spawn may be in the leaf from now on
        if inst.notify is not None:
            inst.notify.reset()  # what an earlier run queued or said is not this run's
        try:
            pid, ticks = await self._spawn_in_partition(inst)
        except BackendError:
            raise
        except OSError as exc:
            killed = await self._killed_while_starting(inst)
            if killed is not None:
                # It did start, and its partition's limit ended it before it could say
                # its pid (a preforked worker is in its partition before it reports):
                # an exit at the limit, for the policy to judge, not a failed spawn.
                self._feed(inst, lambda: lc.exited(killed, time.monotonic()))
                return
            transient = exc.errno in TRANSIENT_SPAWN_ERRORS
            why = exc.strerror or str(exc)
            self._feed(inst, lambda: lc.spawn_failed(why, time.monotonic(), transient=transient))
            return
        run = inst.run = Run(pid)
        # Our child, not waited for until _watch_exit below: its pid is not reused. Read
        # here unless the spawn's thread read it (a process gone already reads None there
        # and here alike).
        inst.ticks = ticks if ticks is not None else await self._start_time(pid)
        self._feed(inst, lambda: lc.spawned(pid, time.monotonic()))
        self._watch_exit(inst, run)

    async def _killed_while_starting(self, inst: Instance) -> ExitReason | None:
        """``memory-limit``/``oom-killed`` when the backend ended this leaf's process at its
        limit during the failed start; ``None`` when nothing says so."""
        try:
            reason = await trio.to_thread.run_sync(
                self.backend.leaf_exit_reason, inst.partition, inst.leaf
            )
        except BackendError:
            return None
        return ExitReason.parse(reason) if reason is not None else None

    def _watch_exit(self, inst: Instance, run: Run) -> None:
        # A callback from the reaper, not a task waiting: a task per running worker was
        # a few KiB of the daemon's memory each (issue 14).
        def exited(status: int) -> None:
            run.status = status
            inst.wake.set()

        self.reaper.on_exit(run.pid, exited)

    async def _spawn_in_partition(self, inst: Instance) -> tuple[int, int | str | None]:
        try:
            return await self._spawn(inst)
        except BackendError as exc:
            if not await self._recreate_partition(inst, exc):
                raise
            return await self._spawn(inst)

    async def _spawn(self, inst: Instance) -> tuple[int, int | str | None]:
        """The new process's pid, and its start time where the spawn's thread read it
        (``None``: not read; ``_start_run`` reads it)."""
        # The worker writes into a pipe whose reader, a log writer process of its own,
        # rotates its files and outlives the daemon if need be (supervise/logpipe.py).
        writer = inst.log_writer
        if writer is None or writer.done.is_set():
            if writer is not None:
                writer.close()  # its process ended (killed?): a new one takes over
            writer, ticks = await logpipe.start_writer_async(
                self.reaper,
                self.log_dir,
                inst.tenant,
                inst.leaf,
                self.log_settings(inst),
                self.launchers.log_writers,
                self._start_time_here,
            )
            inst.log_writer = writer
            inst.writer_ticks = ticks if ticks is not None else await self._start_time(writer.pid)
            logpipe.watch_writer(self.reaper, writer, inst.name)
        launcher = self._launcher(inst)
        if launcher.one_hop:
            # A command: its argv, its settings (user lookups) and the spawn in one
            # worker thread, one hop on a restart's path instead of three.
            def prepare_and_spawn() -> tuple[int, int | str | None]:
                argv = launcher.argv(inst.target)
                process = self._process_settings(inst)
                pid = launcher.spawn_blocking(self._request(inst, writer, argv, process))
                # Its start time too, while in the thread: a /proc read that was
                # 0.1-0.25 ms of the loop on a restart's path.
                return pid, self._start_time_here(pid)

            return await spawnthreads.run(prepare_and_spawn)
        # In a thread: a launcher may prepare files first.
        argv = await trio.to_thread.run_sync(launcher.argv, inst.target)
        process = await trio.to_thread.run_sync(self._process_settings, inst)
        pid = await launcher.spawn(inst.target, self._request(inst, writer, argv, process))
        return pid, None

    def _request(
        self, inst: Instance, writer: logpipe.Writer, argv: list[str], process: ProcessSettings
    ) -> SpawnRequest:
        return SpawnRequest(
            partition=inst.partition,
            leaf=inst.leaf,
            argv=argv,
            cwd=str(inst.spec.cwd) if inst.spec.cwd else None,
            env=self._env(inst),
            stdout=writer.fd,
            stderr=writer.fd,
            # Identity and privileges (confine), then the worker's scheduling, affinity
            # and memlock keys over its tenant's (config/realtime.py).
            process=realtime_settings(self.tenant(inst.tenant).spec, inst.spec, base=process),
        )

    def _start_time_here(self, pid: int) -> int | str | None:
        """A new child's start time, read in the calling (spawn) thread where the clock is
        cheap; ``None``: not read here (``_start_time`` reads it on the loop). Never
        raises: nothing raised after a spawn may lose the process."""
        clock = self.backend.process_clock()
        if not clock.cheap:
            return None
        with contextlib.suppress(ValueError, IndexError, OSError):
            return clock.start_time(pid)
        return None

    async def _start_time(self, pid: int) -> int | str | None:
        """A process's start time for the runtime state, by the backend's clock
        (partition/proctime.py); one that runs a utility (QNX's pidin) in a thread."""
        clock = self.backend.process_clock()
        if clock.cheap:
            return clock.start_time(pid)
        return await trio.to_thread.run_sync(clock.start_time, pid)

    def _process_settings(self, inst: Instance) -> ProcessSettings:
        """Identity and privileges (supervise/confine.py); the worker's own notify socket
        becomes its uid's. Blocking."""
        spec = self.tenant(inst.tenant).spec
        settings = confine.settings_for(self.config, spec, inst.spec, inst.index)
        if spec.delegate:
            confine.delegate(self.backend, inst.partition, settings)
        if inst.notify is not None:
            confine.grant(inst.notify.path, settings)
        return settings

    def _env(self, inst: Instance) -> dict[str, str]:
        # Workers get a small, predictable environment, not the daemon's own.
        env = {
            "PATH": confine.WORKER_PATH,
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "SUPERVISORD_QNX_TENANT": inst.tenant,
            "SUPERVISORD_QNX_WORKER": inst.spec.name,
            "SUPERVISORD_QNX_INSTANCE": str(inst.index),
            "SUPERVISORD_QNX_PARTITION": inst.partition,
        }
        env.update(inst.spec.env)
        env[leftovers.OWNER_ENV] = self.owner  # after the tenant's env: not overridable
        if inst.spec.uses_notify and inst.notify is None:
            raise OSError(errno.EIO, "no NOTIFY_SOCKET for this worker (see the daemon's log)")
        if inst.notify is not None:
            # As systemd gives a Type=notify service; after the tenant's own env, which
            # must not point the worker elsewhere. No WATCHDOG_PID: the pid is not known
            # before the spawn, and without it the variables mean "this process".
            env["NOTIFY_SOCKET"] = inst.notify.path
            if inst.spec.watchdog is not None:
                env["WATCHDOG_USEC"] = str(round(inst.spec.watchdog * 1_000_000))
        return env

    async def _exit_reason(self, inst: Instance, status: int) -> ExitReason:
        """The most specific reason: the backend's ``oom-killed``/``memory-limit`` over the
        launcher's own word (what the worker's runner reported) over the raw wait status."""
        try:
            if self._left_to_shutdown(inst):
                reason = None  # stopped by the shutdown: no thread hop, no backend lock
            else:
                after = self.backend.leaf_after_exit_now(inst.partition, inst.leaf)
                if after is None:
                    after = await trio.to_thread.run_sync(
                        self.backend.leaf_after_exit, inst.partition, inst.leaf
                    )
                reason = after.reason
                inst.leaf_empty = not after.members
        except BackendError as exc:
            # The leaf's counters are gone (its partition removed from outside): the wait
            # status still tells how it ended; the next spawn re-creates the partition.
            log.warning("backend exit reason unavailable", worker=inst.name, error=str(exc))
            reason = None
        if reason is not None:
            return ExitReason.parse(reason)
        told = await self._launcher(inst).exit_reason(inst.target, status)
        if told is not None:
            return told
        return describe_status(status)

    async def _unknown_exit_reason(self, inst: Instance) -> ExitReason:
        """An adopted run that was not our child ended: no wait status reaches us, only
        what the backend can still tell (a cgroup's OOM counter), then what the process
        reported itself (a wasm runner's report), else ``exit:unknown``."""
        try:
            reason = await trio.to_thread.run_sync(
                self.backend.leaf_exit_reason, inst.partition, inst.leaf
            )
        except BackendError:
            reason = None
        if reason is not None:
            return ExitReason.parse(reason)
        told = await self._launcher(inst).reported_exit(inst.target)
        return told if told is not None else UNKNOWN_EXIT

    def adopt_run(self, inst: Instance, pid: int, started_at: float, gone: GoneWaiter) -> None:
        """Make a previous daemon's live run of ``inst`` this one's (supervise/adopt.py):
        ``running`` with its pid and uptime; ``gone`` returns once it ended (``None``) or
        with its wait status when it is our child (after a reexec)."""
        run = inst.run = Run(pid, known=False)
        self._feed(inst, lambda: inst.lc.adopted(pid, started_at, time.monotonic()))
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_adopted, inst, run, gone)

    def resume_backoff(self, inst: Instance, delay: float) -> None:
        """A previous daemon's backoff of ``inst`` goes on: restart in ``delay`` seconds."""
        self._feed(inst, lambda: inst.lc.resumed(delay, time.monotonic()))
        inst.wake.set()

    async def restart_instances(self, instances: list[Instance]) -> None:
        """Restart these instances (adopted ones whose definition changed meanwhile)."""
        seqs = [self._call(inst, inst.lc.restart) for inst in instances]
        not_stopping = frozenset(State) - {State.STOPPING}
        await self._answer_for(instances, seqs, not_stopping)

    async def _watch_adopted(self, inst: Instance, run: Run, gone: GoneWaiter) -> None:
        try:
            status = await gone()
            run.known = status is not None
            run.status = 0 if status is None else status
        except Exception as exc:  # noqa: BLE001 - handed to the instance task's boundary
            run.failure = exc
        inst.wake.set()

    async def refresh_counters(self) -> None:
        """Re-read live counters running workers report (for ``status``)."""
        for tenant in self.tenants.values():
            for inst in tenant.instances:
                launcher = self._launcher(inst)
                if inst.state is State.RUNNING and launcher.reports_counters:
                    await launcher.refresh(inst.target)

    def _left_to_shutdown(self, inst: Instance) -> bool:
        return self.shutdown.defers(inst.tenant, inst.lc.want_running)

    async def _clear_leaf(self, inst: Instance) -> None:
        """Kill whatever the worker left in its partition leaf (grandchildren included)."""
        survivors = await self.backend.kill_leaf(inst.partition, inst.leaf)
        if survivors:
            log.warning("leftover processes survived SIGKILL", worker=inst.name, pids=survivors)
