"""The supervisor: one task per worker instance, driving the state table in ``worker.py``
with the decisions of ``policy.py``, spawning through the backend.

Ownership (structured concurrency): the supervisor's nursery owns every
instance task; an instance task owns its process for as long as it runs.
Stopping is a request the instance task notices (``stop_requested``) plus
signals to the process; the task itself records the final state, so state
always changes in one place per instance.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from supervisord_qnx.config.model import Config, TenantSpec, WasmWorker, WorkerBase
from supervisord_qnx.partition.backend import Backend, BackendEvent, SpawnRequest
from supervisord_qnx.partition.tree import PartitionTree
from supervisord_qnx.supervise.events import EventBus
from supervisord_qnx.supervise.policy import Decision, RestartTracker, Verdict
from supervisord_qnx.supervise.prefork import ForkServerKeeper
from supervisord_qnx.supervise.reaper import ChildReaper, describe_status
from supervisord_qnx.supervise.worker import SETTLED_AFTER_START, Event, State, next_state
from supervisord_qnx.wasm.forkserver import ForkServerGone

log = structlog.get_logger("supervisord_qnx.supervisor")


# Resident size of a wasm runner itself (interpreter + wasmtime + compiled code),
# subtracted from a partition's max for the default linear-memory cap.
# bench/bench_wasm.py measured 28 MiB with a warm cache and 35 MiB while compiling
# (Cranelift's peak); bench/bench_wasm_tenants.py measured the same through the daemon.
# A constant rather than a measurement at start: the peak that matters is the
# compile, which a warm daemon no longer sees, and a cap must not change between
# restarts. 40 = the 35 MiB compile peak + 5 MiB for the store's own allocations.
WASM_RUNNER_OVERHEAD = 40 << 20
WASM_PAGE = 64 * 1024


class NotFound(Exception):
    pass


@dataclass(eq=False)
class Instance:
    """One running copy of a worker (``instances = 3`` gives three)."""

    tenant: str
    partition: str
    spec: WorkerBase
    index: int
    tracker: RestartTracker
    state: State = State.STOPPED
    pid: int | None = None
    started_at: float | None = None  # monotonic
    exit_reason: str | None = None
    restarts: int = 0
    stop_requested: bool = False
    changed: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope | None = None
    wasm_denials: int = 0
    wasm_report_stamp: int = 0  # mtime of the report when wasm_denials was read

    @property
    def leaf(self) -> str:
        return f"{self.spec.name}-{self.index}"

    @property
    def name(self) -> str:
        return f"{self.tenant}:{self.leaf}"

    def as_dict(self) -> dict[str, Any]:
        uptime = (
            round(time.monotonic() - self.started_at, 3)
            if self.started_at is not None and self.state is State.RUNNING
            else None
        )
        out: dict[str, Any] = {
            "tenant": self.tenant,
            "worker": self.spec.name,
            "instance": self.index,
            "name": self.name,
            "kind": getattr(self.spec, "kind", "command"),
            "state": str(self.state),
            "pid": self.pid,
            "partition": self.partition,
            "restarts": self.restarts,
            "exit_reason": self.exit_reason,
            "uptime": uptime,
        }
        if isinstance(self.spec, WasmWorker):
            out["memory_denied"] = self.wasm_denials
        return out


@dataclass(eq=False)
class Tenant:
    spec: TenantSpec
    instances: list[Instance]
    start_order: int = 0


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
        self._order = 0
        self._nursery: trio.Nursery | None = None
        # Set by the daemon: whether it is a child subreaper. The wasm fork server's
        # workers reach the daemon as its children only then (docs/wasm.md, 7.).
        self.subreaper = False
        self.forkserver = ForkServerKeeper(reaper, self.log_dir / "wasm-forkserver.log")
        for spec in config.tenants:
            self.tenants[spec.name] = Tenant(
                spec,
                [
                    Instance(spec.name, spec.path, w, i, RestartTracker(spec.restart))
                    for w in spec.worker
                    for i in range(w.instances)
                ],
            )

    # -- lifecycle of the whole supervisor -------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own every instance task; returns only when cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = self.forkserver.nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.forkserver.kill()

    async def start_autostart(self) -> None:
        """Start every autostart tenant (config order); wait until each settled."""
        async with trio.open_nursery() as nursery:
            for tenant in self.tenants.values():
                if tenant.spec.autostart:
                    nursery.start_soon(self.start, tenant.spec.name, True)

    async def stop_all(self) -> None:
        """Stop every tenant, most recently started first (OTP's reverse start order)."""
        for tenant in sorted(self.tenants.values(), key=lambda t: -t.start_order):
            await self.stop(tenant.spec.name, wait=True)

    # -- operator commands ---------------------------------------------------------

    def tenant(self, name: str) -> Tenant:
        try:
            return self.tenants[name]
        except KeyError:
            known = ", ".join(sorted(self.tenants)) or "none"
            raise NotFound(f"no tenant named {name!r} (known: {known})") from None

    async def start(self, name: str, wait: bool = False) -> list[dict[str, Any]]:
        tenant = self.tenant(name)
        self._order += 1
        tenant.start_order = self._order
        for inst in tenant.instances:
            if inst.state in (State.STOPPED, State.EXITED, State.FATAL):
                inst.tracker.reset()
                inst.stop_requested = False
                self._transition(inst, Event.START)
                assert self._nursery is not None
                self._nursery.start_soon(self._run_instance, inst)
            elif inst.state is State.STOPPING:
                # Stop in progress: let it finish, then start afresh.
                await inst.exited.wait()
                await self._await_state(inst, {State.STOPPED})
                return await self.start(name, wait)
        if wait:
            for inst in tenant.instances:
                await self._await_state(inst, SETTLED_AFTER_START)
        return [i.as_dict() for i in tenant.instances]

    async def stop(self, name: str, wait: bool = True) -> list[dict[str, Any]]:
        tenant = self.tenant(name)
        if not wait:
            assert self._nursery is not None
            self._nursery.start_soon(self._stop_tenant, tenant)
            await trio.lowlevel.checkpoint()
        else:
            await self._stop_tenant(tenant)
        return [i.as_dict() for i in tenant.instances]

    async def _stop_tenant(self, tenant: Tenant) -> None:
        async with trio.open_nursery() as nursery:
            for inst in tenant.instances:
                nursery.start_soon(self._stop_instance, inst)
        for inst in tenant.instances:
            await trio.to_thread.run_sync(self.backend.release_leaf, inst.partition, inst.leaf)

    async def restart(self, name: str, wait: bool = False) -> list[dict[str, Any]]:
        await self.stop(name, wait=True)
        return await self.start(name, wait)

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        tenants = [self.tenant(name)] if name is not None else list(self.tenants.values())
        return [i.as_dict() for t in tenants for i in t.instances]

    def log_path(self, inst: Instance) -> Path:
        return self.log_dir / f"{inst.tenant}.{inst.leaf}.log"

    def find_instances(self, tenant: str, worker: str | None = None) -> list[Instance]:
        t = self.tenant(tenant)
        found = [i for i in t.instances if worker in (None, i.spec.name, i.leaf)]
        if not found:
            raise NotFound(f"tenant {tenant!r} has no worker {worker!r}")
        return found

    def on_backend_event(self, event: BackendEvent) -> None:
        self.events.emit(
            str(event.kind),
            partition=event.partition,
            leaf=event.leaf,
            **{k: v for k, v in event.detail.items() if k not in ("partition", "leaf")},
        )

    # -- one instance ---------------------------------------------------------------

    def _transition(self, inst: Instance, event: Event) -> None:
        old = inst.state
        inst.state = next_state(old, event)
        if inst.state is not old:
            inst.changed.set()
            inst.changed = trio.Event()
            self.events.emit(
                "state",
                worker=inst.name,
                old=str(old),
                new=str(inst.state),
                pid=inst.pid,
                exit_reason=inst.exit_reason,
            )

    async def _await_state(self, inst: Instance, states: frozenset[State] | set[State]) -> None:
        while inst.state not in states:
            await inst.changed.wait()

    async def _run_instance(self, inst: Instance) -> None:
        with trio.CancelScope() as scope:
            inst.scope = scope
            try:
                await self._instance_loop(inst)
            finally:
                inst.scope = None

    async def _instance_loop(self, inst: Instance) -> None:
        while True:
            try:
                pid = await self._spawn(inst)
            except OSError as exc:
                inst.exit_reason = f"spawn-failed: {exc.strerror or exc}"
                self._transition(inst, Event.SPAWN_FAILED)
                self.events.emit("fatal", worker=inst.name, exit_reason=inst.exit_reason)
                return
            inst.pid = pid
            inst.started_at = time.monotonic()
            inst.exited = trio.Event()
            self._transition(inst, Event.SPAWNED)
            status = await self.reaper.wait(pid)
            uptime = time.monotonic() - inst.started_at
            inst.exit_reason = await self._exit_reason(inst, status)
            inst.exited.set()
            if inst.stop_requested:
                return  # _stop_instance finishes the job (leftovers, final state)
            decision = inst.tracker.decide(inst.exit_reason, time.monotonic(), uptime)
            if decision.verdict is Verdict.RESTART and _unrunnable(inst):
                # A module that cannot be compiled or instantiated fails the same way on
                # every try: no restart loop, straight to fatal.
                decision = Decision(Verdict.FATAL)
            if decision.verdict is Verdict.FINAL:
                self._transition(inst, Event.EXIT_FINAL)
                await self._clear_leaf(inst)
                return
            if decision.verdict is Verdict.FATAL:
                self._transition(inst, Event.EXIT_FATAL)
                self.events.emit(
                    "fatal",
                    worker=inst.name,
                    exit_reason=inst.exit_reason,
                    restarts=inst.restarts,
                    window=inst.tracker.spec.window,
                )
                await self._clear_leaf(inst)
                return
            self._transition(inst, Event.EXIT_RESTART)
            await self._clear_leaf(inst)
            await trio.sleep(decision.delay)
            inst.restarts += 1
            self.events.emit("restart", worker=inst.name, after=decision.delay)
            self._transition(inst, Event.BACKOFF_DONE)

    async def _spawn(self, inst: Instance) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.log_path(inst), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            request = SpawnRequest(
                partition=inst.partition,
                leaf=inst.leaf,
                argv=self._argv(inst),
                cwd=str(inst.spec.cwd) if inst.spec.cwd else None,
                env=self._env(inst),
                stdout=fd,
                stderr=fd,
            )
            if isinstance(inst.spec, WasmWorker) and self._prefork_possible():
                pid = await self._spawn_preforked(inst, request)
                if pid is not None:
                    return pid

            def spawn_blocking() -> int:
                _require_program(request)
                with self.reaper.spawning():
                    popen = self.backend.spawn(request)
                    self.reaper.register(popen.pid)
                    # The reaper owns the status from here on; keep subprocess from
                    # ever waiting on (and stealing) it.
                    popen.returncode = 0
                    return popen.pid

            return await trio.to_thread.run_sync(spawn_blocking)
        finally:
            os.close(fd)

    # -- wasm fork server (docs/wasm.md, 7.) ------------------------------------------

    def _prefork_possible(self) -> bool:
        return self.config.daemon.wasm_prefork and self.subreaper

    @property
    def forkserver_pid(self) -> int | None:
        return self.forkserver.pid

    async def stop_forkserver(self) -> None:
        await self.forkserver.stop()

    async def _spawn_preforked(self, inst: Instance, request: SpawnRequest) -> int | None:
        """Start a wasm worker from the fork server; ``None``: use the plain runner.

        Raises ``OSError`` (spawn-failed, like ``backend.spawn``) when the server ran
        the start but the worker could not attach itself."""
        plan = await trio.to_thread.run_sync(self.backend.attach_plan, request)
        if plan is None:
            return None
        server = await self.forkserver.ready()
        if server is None:
            return None
        argv = list(request.argv)
        runner_argv = argv[3:]  # after "<python> -m supervisord_qnx.wasm.runner"
        cwd = request.cwd or os.getcwd()

        def spawn_blocking() -> int:
            # The orphan sweep stays off for the whole request: the worker becomes the
            # daemon's child before the server answers, and may already have ended.
            with self.reaper.spawning():
                pid = server.spawn(runner_argv, request.env, cwd, request.stdout, plan.as_dict())
                self.reaper.register(pid)
                return pid

        try:
            return await trio.to_thread.run_sync(spawn_blocking)
        except ForkServerGone as exc:
            # Slower, never stopped: this start uses the plain runner; the next start
            # brings a new server up.
            log.warning("wasm fork server lost; plain runner for this start", error=str(exc))
            return None

    def _env(self, inst: Instance) -> dict[str, str]:
        # Workers get a small, predictable environment, not the daemon's own.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "SUPERVISORD_QNX_TENANT": inst.tenant,
            "SUPERVISORD_QNX_WORKER": inst.spec.name,
            "SUPERVISORD_QNX_INSTANCE": str(inst.index),
            "SUPERVISORD_QNX_PARTITION": inst.partition,
        }
        env.update(inst.spec.env)
        return env

    def _argv(self, inst: Instance) -> list[str]:
        spec = inst.spec
        if isinstance(spec, WasmWorker):
            return self._wasm_argv(inst, spec)
        return list(getattr(spec, "command"))  # noqa: B009 - CommandWorker

    def wasm_report_path(self, inst: Instance) -> Path:
        return self.state_dir / "wasm" / f"{inst.tenant}.{inst.leaf}.report"

    def _wasm_argv(self, inst: Instance, spec: WasmWorker) -> list[str]:
        report = self.wasm_report_path(inst)
        report.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            report.unlink()
        argv = [sys.executable, "-m", "supervisord_qnx.wasm.runner", "--module", str(spec.wasm)]
        for a in spec.args:
            argv += ["--arg", a]
        for k, v in spec.env.items():
            argv += ["--env", f"{k}={v}"]
        for guest, host in spec.preopen.items():
            argv += ["--preopen", f"{guest}={host}"]
        limits = spec.limits
        memory = limits.memory if limits.memory is not None else self._default_wasm_memory(inst)
        if memory is not None:
            argv += ["--memory", str(memory)]
        for flag, value in (
            ("--tables", limits.tables),
            ("--instances", limits.instances),
            ("--fuel", limits.fuel),
            ("--timeout", limits.timeout),
        ):
            if value is not None:
                argv += [flag, str(value)]
        argv += ["--cache-dir", str(self.state_dir / "wasm-cache"), "--report", str(report)]
        return argv

    def _default_wasm_memory(self, inst: Instance) -> int | None:
        """The partition's max, shared among the tenant's instances, less what the runner
        process itself occupies, so the module meets a failed ``memory.grow`` before the
        OS partition has to kill the whole process."""
        cap = self.tree[inst.partition].effective_memory_max
        if cap is None:
            return None
        share = cap // max(1, sum(w.instances for w in self.tenant(inst.tenant).spec.worker))
        # Whole wasm pages: memory.grow works in pages, so a partial page is never usable.
        return max(WASM_PAGE, (share - WASM_RUNNER_OVERHEAD) // WASM_PAGE * WASM_PAGE)

    async def _exit_reason(self, inst: Instance, status: int) -> str:
        """The most specific reason: the backend's (oom-killed, memory-limit) over the
        wasm runner's report (trap, deadline) over the raw wait status."""
        reason = await trio.to_thread.run_sync(
            self.backend.leaf_exit_reason, inst.partition, inst.leaf
        )
        if reason is not None:
            return reason
        if isinstance(inst.spec, WasmWorker):
            from supervisord_qnx.wasm.outcome import read_report

            report = read_report(self.wasm_report_path(inst))
            inst.wasm_denials = _denials(report)
            if report["exit"] and report["exit"].get("reason"):
                return str(report["exit"]["reason"])
        return describe_status(status)

    def refresh_wasm_counters(self) -> None:
        """Read live wasm runner counters (memory.grow denials) for ``status``."""
        from supervisord_qnx.wasm.outcome import read_report

        for tenant in self.tenants.values():
            for inst in tenant.instances:
                if isinstance(inst.spec, WasmWorker) and inst.state is State.RUNNING:
                    path = self.wasm_report_path(inst)
                    try:
                        stamp = path.stat().st_mtime_ns
                    except FileNotFoundError:
                        continue
                    # status is a hot path: re-read a report only when the runner wrote
                    # to it since the last look (it coalesces denials to ~1 line a second).
                    if stamp != inst.wasm_report_stamp:
                        inst.wasm_report_stamp = stamp
                        inst.wasm_denials = _denials(read_report(path))

    async def _stop_instance(self, inst: Instance) -> None:
        if inst.state is State.BACKOFF:
            if inst.scope is not None:
                inst.scope.cancel()
            self._transition(inst, Event.STOP)
            return
        if inst.state is State.STARTING:
            inst.stop_requested = True
            await self._await_state(inst, {State.RUNNING, State.FATAL, State.STOPPED})
        if inst.state is not State.RUNNING:
            self._transition(inst, Event.STOP)  # idempotent rows for settled states
            return
        inst.stop_requested = True
        self._transition(inst, Event.STOP)
        pid = inst.pid
        assert pid is not None
        if not inst.exited.is_set():
            _signal_group(pid, inst.spec.stop_signal)
            with trio.move_on_after(inst.spec.stop_timeout):
                await inst.exited.wait()
        if not inst.exited.is_set():
            _signal_group(pid, signal.SIGKILL)
        await self._clear_leaf(inst)
        await inst.exited.wait()
        if inst.exit_reason is not None and not inst.exit_reason.startswith("stopped"):
            inst.exit_reason = f"stopped ({inst.exit_reason})"
        self._transition(inst, Event.STOPPED)

    async def _clear_leaf(self, inst: Instance) -> None:
        """Kill whatever the worker left in its partition leaf (grandchildren included)."""
        for _ in range(50):
            pids = await trio.to_thread.run_sync(self.backend.pids, inst.partition, inst.leaf)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await trio.sleep(0.01)
        log.warning("leftover processes survived SIGKILL", worker=inst.name, pids=pids)


def _unrunnable(inst: Instance) -> bool:
    from supervisord_qnx.wasm.outcome import REASON_INVALID_PREFIX

    reason = inst.exit_reason or ""
    return isinstance(inst.spec, WasmWorker) and reason.startswith(REASON_INVALID_PREFIX)


def _require_program(request: SpawnRequest) -> None:
    """Raise ``FileNotFoundError``/``PermissionError`` for a program that cannot run.

    Backends start workers behind an exec shim (it keeps spawning on the vfork path), so
    a missing program would otherwise show up as the shim's ``exit:127`` and a restart
    loop instead of a ``spawn-failed`` worker that tells the operator what is wrong.
    """
    program = request.argv[0]
    if "/" in program:
        path: str | None = os.path.join(request.cwd or os.getcwd(), program)
    else:
        path = shutil.which(program, path=request.env.get("PATH", os.defpath))
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, f"no such program: {program}", program)
    if not os.access(path, os.X_OK):
        raise PermissionError(errno.EACCES, f"not executable: {path}", path)


def _denials(report: dict[str, Any]) -> int:
    denied = report.get("memory_denied") or {}
    return int(denied.get("count") or 0)


def _signal_group(pid: int, sig: int) -> None:
    """Workers lead their own session (start_new_session), so the group is theirs alone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
