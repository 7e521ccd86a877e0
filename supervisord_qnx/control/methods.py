"""The daemon's control methods: names, parameters, results.

Each handler takes the request's named params (already a dict) and returns
plain data, or raises ``RpcError``. Parameters are checked here, strictly:
an unknown or mistyped parameter is ``bad_request`` naming it, because a
script that misspells ``wait`` should hear so, not silently not wait.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import structlog
import trio

from supervisord_qnx import __version__, attached, logtail
from supervisord_qnx.config.load import ConfigError
from supervisord_qnx.config.model import Config
from supervisord_qnx.control.access import Authorizer
from supervisord_qnx.control.jobs import JobMethods
from supervisord_qnx.control.metrics import Exporter, error_code
from supervisord_qnx.control.report import partitions_report
from supervisord_qnx.control.rpc import ErrorCode, Packed, RpcError
from supervisord_qnx.control.server import Connection, MethodTable, Streaming
from supervisord_qnx.control.server import Handler as ServerHandler
from supervisord_qnx.control.statusrows import (
    TABLE_COLUMNS,
    StatusRows,
    picked,
    tabulate,
    wanted_fields,
)
from supervisord_qnx.control.subscribe import EventFilter, Subscribers, names_param
from supervisord_qnx.partition.backend import Backend, BackendError
from supervisord_qnx.partition.limits import BadLimits, parse_set
from supervisord_qnx.partition.tree import PartitionTree
from supervisord_qnx.supervise.events import EventBus, ProcessAttached, ProcessDetached
from supervisord_qnx.supervise.jobs import JOB_TENANT, Jobs
from supervisord_qnx.supervise.ordering import AfterFailed
from supervisord_qnx.supervise.reload import LiveChanges
from supervisord_qnx.supervise.supervisor import NotFound, Supervisor

T = TypeVar("T")


class DaemonView(Protocol):
    """What the control methods use of the daemon, and nothing more (the daemon wires
    them up; they never import it)."""

    config: Config
    backend: Backend
    tree: PartitionTree
    supervisor: Supervisor
    jobs: Jobs
    events: EventBus
    attached: attached.Registry
    io_backend: str
    live: LiveChanges

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run slow backend work or file I/O in the daemon's limited pool for it."""
        ...

    def request_shutdown(self) -> None: ...

    def request_reexec(self) -> None: ...


log = structlog.get_logger("supervisord_qnx.control")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

_TYPES: dict[type, str] = {str: "a string", bool: "a boolean", int: "an integer"}


def _params(params: dict[str, Any], **spec: tuple[type, bool]) -> dict[str, Any]:
    """Check ``params`` against ``name=(type, required)``; return them or raise bad_request."""
    unknown = sorted(set(params) - set(spec))
    if unknown:
        allowed = ", ".join(sorted(spec)) or "none"
        raise RpcError(
            ErrorCode.BAD_REQUEST, f"unknown parameter(s) {', '.join(unknown)}; allowed: {allowed}"
        )
    for name, (kind, required) in spec.items():
        if name not in params:
            if required:
                raise RpcError(ErrorCode.BAD_REQUEST, f"missing parameter {name!r}")
            continue
        value = params[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise RpcError(
                ErrorCode.BAD_REQUEST,
                f"parameter {name!r} must be {_TYPES.get(kind, kind.__name__)}, "
                f"got {type(value).__name__}",
            )
    return params


def _translated(handler: Handler) -> ServerHandler:
    """A method as the server calls it, with the supervisor's and the backend's own
    errors answered as the protocol's codes."""

    async def call(params: dict[str, Any], conn: Connection) -> Any:  # noqa: ARG001
        try:
            return await handler(params)
        except NotFound as exc:
            raise RpcError(ErrorCode.NOT_FOUND, str(exc)) from None
        except AfterFailed as exc:
            raise RpcError(ErrorCode.INVALID_STATE, str(exc)) from None
        except BackendError as exc:
            raise RpcError(ErrorCode.BACKEND_ERROR, str(exc)) from None
        except ConfigError as exc:
            n = len(exc.problems)
            raise RpcError(
                ErrorCode.CONFIG_INVALID,
                f"{n} problem{'s' if n != 1 else ''}; nothing was changed",
                problems=[str(p) for p in exc.problems],
            ) from None

    return call


class Methods:
    """The method table the control server dispatches to."""

    def __init__(self, daemon: DaemonView) -> None:
        self.daemon = daemon
        # attach/detach read and update the attached-process records: one at a time.
        self._attach_lock = trio.Lock()
        jobs = JobMethods(daemon)
        handlers: dict[str, Handler] = {
            "ping": self.ping,
            "version": self.version,
            "status": self.status,
            "partitions": self.partitions,
            "start": self.start,
            "stop": self.stop,
            "restart": self.restart,
            "logs": self.logs,
            "attach": self.attach,
            "detach": self.detach,
            "events": self.recent_events,
            "metrics": self.metrics,
            "run": jobs.run,
            "job": jobs.job,
            "shutdown": self.shutdown,
            "reload": self.reload,
            "set": self.set_limits,
            "reexec": self.reexec,
        }
        self.table = MethodTable({name: _translated(h) for name, h in handlers.items()})
        # Reads the daemon only when rendered (building the table touches nothing).
        self.exporter = Exporter(daemon, self.table.__contains__)
        # subscribe/unsubscribe act on the connection itself, so they take it.
        self.subscribers: Subscribers | None = None
        self.table.add("subscribe", self.subscribe)
        self.table.add("unsubscribe", self.unsubscribe)
        self._paths_for: Config | None = None
        self._paths: dict[str, str] = {}
        # Who may call what (access.py): checked before every handler.
        self.access = Authorizer(lambda: self.daemon.config, self._job_partition)
        self.status_rows = StatusRows()

    async def dispatch(self, method: str, params: dict[str, Any], conn: Connection) -> Any:
        # Every request is counted with the code it is answered with, and timed.
        began, code = time.monotonic(), "ok"
        try:
            if method in self.table:
                self.access.check(method, params, conn.peer)
            return await self.table(method, params, conn)
        except BaseException as exc:
            code = error_code(exc)
            raise
        finally:
            self.exporter.requests.observe(method, code, time.monotonic() - began)

    def _job_partition(self, job_id: int) -> str | None:
        try:
            return self.daemon.jobs.get(job_id).path
        except Exception:  # noqa: BLE001 - an unknown job belongs to no tenant
            return None

    async def ping(self, params: dict[str, Any]) -> str:
        _params(params)
        return "pong"

    async def version(self, params: dict[str, Any]) -> dict[str, Any]:
        _params(params)
        return {
            "version": __version__,
            "python": platform.python_version(),
            "backend": self.daemon.backend.name,
            "io": self.daemon.io_backend,
        }

    async def status(
        self, params: dict[str, Any]
    ) -> list[dict[str, Any]] | dict[str, Any] | Packed:
        p = _params(params, tenant=(str, False), fields=(list, False), table=(bool, False))
        fields = wanted_fields(p["fields"]) if "fields" in p else None
        table = p.get("table", False)
        sup = self.daemon.supervisor
        tenant, jobs = p.get("tenant"), self.daemon.jobs.status()
        if tenant == JOB_TENANT and tenant not in sup.tenants:
            # transient jobs show as the tenant "job" (docs/protocol.md, run)
            shown = jobs if fields is None else picked(jobs, fields)
            return tabulate(shown, fields or list(TABLE_COLUMNS)) if table else shown
        rows = self.status_rows
        jobs = jobs if tenant is None else []
        if fields is not None:
            if "memory_denied" in fields:  # the one field a running worker's report updates
                await sup.refresh_counters()
            got = await rows.reply_fields(sup, tenant, jobs, fields, self.daemon.blocking)
            return tabulate(got, fields) if table else got
        # The rows Supervisor.status and with_sched give (counters refreshed first),
        # packed and reused (statusrows.py); as a table, if asked.
        return await rows.reply(sup, tenant, jobs, table=table)

    async def partitions(self, params: dict[str, Any]) -> dict[str, Any]:
        p = _params(params, partition=(str, False))
        under = p.get("partition", "")
        # A subtree: what keeps the answer within the message limit with thousands of
        # tenants (about 0.5 KiB each), and reads only its figures.
        if "partition" in p and (not under or under not in self.daemon.tree):
            raise RpcError(ErrorCode.NOT_FOUND, f"no partition {under!r}")
        return await partitions_report(
            self.daemon.backend,
            self.daemon.tree,
            self.daemon.blocking,
            overrides=self.daemon.live.overrides.to_dict(),
            under=under,
        )

    async def start(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        p = _params(params, tenant=(str, True), wait=(bool, False))
        return await self.daemon.supervisor.start(p["tenant"], p.get("wait", False))

    async def stop(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        p = _params(params, tenant=(str, True), wait=(bool, False))
        return await self.daemon.supervisor.stop(p["tenant"], p.get("wait", True))

    async def restart(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        p = _params(params, tenant=(str, True), wait=(bool, False))
        return await self.daemon.supervisor.restart(p["tenant"], p.get("wait", False))

    async def logs(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        p = _params(params, tenant=(str, True), worker=(str, False), lines=(int, False))
        lines = p.get("lines", 50)
        if not 0 < lines <= 10_000:
            raise RpcError(ErrorCode.BAD_REQUEST, "parameter 'lines' must be 1..10000")
        sup = self.daemon.supervisor
        instances = sup.find_instances(p["tenant"], p.get("worker"))
        # Every worker's tail together must fit in one reply; leave room for the framing.
        budget = max(4096, self.daemon.config.daemon.max_message_bytes * 3 // 4)
        budget //= max(1, len(instances))
        out = []
        for inst in instances:
            path = sup.log_path(inst)
            try:
                keep = sup.log_settings(inst).keep
                text = await self.daemon.blocking(
                    logtail.tail_rotated, path, keep, lines, budget=budget
                )
            except logtail.NotRegular as exc:
                raise RpcError(ErrorCode.INVALID_STATE, f"log of {inst.name}: {exc}") from None
            except OSError as exc:
                raise RpcError(
                    ErrorCode.BACKEND_ERROR, f"log of {inst.name}: cannot read {path}: {exc}"
                ) from None
            out.append({"worker": inst.name, "file": str(path), "lines": text})
        return out

    async def attach(self, params: dict[str, Any]) -> dict[str, Any]:
        p = _params(params, partition=(str, True), pid=(int, True), own=(bool, False))
        partition, pid, own = p["partition"], p["pid"], p.get("own", False)
        if not partition or partition not in self.daemon.tree:
            raise RpcError(ErrorCode.NOT_FOUND, f"no partition {partition!r}")
        # Read on the trio thread: the supervisor's state is not for worker threads.
        supervised = [w["pid"] for w in self.daemon.supervisor.status() if w.get("pid")]
        supervised += self.daemon.jobs.pids()
        forkserver = self.daemon.supervisor.launchers.forkserver_pid
        if forkserver:
            supervised.append(forkserver)
        async with self._attach_lock:
            reply = await self.daemon.blocking(
                self._attach_blocking, partition, pid, own, supervised
            )
        self.daemon.events.emit(ProcessAttached(pid, partition, own))
        return reply

    def _attach_blocking(
        self, partition: str, pid: int, own: bool, supervised: list[int]
    ) -> dict[str, Any]:
        registry = self.daemon.attached
        try:
            info = attached.check(pid, supervised)
        except attached.Refused as exc:
            raise RpcError(_REFUSAL[exc.kind], str(exc)) from None
        earlier = registry.get(pid)
        if earlier is not None and earlier.started != info.started:
            registry.drop(pid)  # that process is gone; this pid is another one
            earlier = None
        try:
            before = self.daemon.backend.attach(partition, pid)
        except ProcessLookupError:
            raise RpcError(ErrorCode.NOT_FOUND, f"no process {pid}") from None
        except OSError as exc:
            raise RpcError(ErrorCode.BACKEND_ERROR, f"attach {pid}: {exc}") from None
        # Moved again: where it was before the *first* attach is where detach returns it.
        previous = earlier.previous if earlier is not None else before
        registry.put(attached.Attached(pid, partition, info.started, own, previous))
        log.info("process attached", pid=pid, partition=partition, own=own)
        return {"partition": partition, "pid": pid, "own": own}

    async def detach(self, params: dict[str, Any]) -> dict[str, Any]:
        p = _params(params, pid=(int, True))
        pid = p["pid"]
        if pid <= 0:
            raise RpcError(ErrorCode.BAD_REQUEST, f"pid must be a positive process id, got {pid}")
        async with self._attach_lock:
            reply = await self.daemon.blocking(self._detach_blocking, pid)
        self.daemon.events.emit(ProcessDetached(pid, reply["partition"]))
        return reply

    def _detach_blocking(self, pid: int) -> dict[str, Any]:
        registry = self.daemon.attached
        entry = registry.get(pid)
        if entry is None:
            raise RpcError(
                ErrorCode.INVALID_STATE,
                f"pid {pid} is not attached (only processes put into a partition with "
                f"attach can be detached)",
            )
        if not entry.same_process():
            registry.drop(pid)
            raise RpcError(ErrorCode.NOT_FOUND, f"process {pid} has exited; it is forgotten")
        try:
            self.daemon.backend.detach(pid, entry.previous)
        except ProcessLookupError:
            registry.drop(pid)
            raise RpcError(ErrorCode.NOT_FOUND, f"process {pid} has exited") from None
        except OSError as exc:
            raise RpcError(ErrorCode.BACKEND_ERROR, f"detach {pid}: {exc}") from None
        registry.drop(pid)
        log.info("process detached", pid=pid, partition=entry.partition)
        return {"pid": pid, "partition": entry.partition}

    async def recent_events(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        p = _params(
            params,
            limit=(int, False),
            kind=(str, False),
            topics=(list, False),
            tenants=(list, False),
        )
        events = list(self.daemon.events.history)
        if "kind" in p:
            events = [e for e in events if e["kind"] == p["kind"]]
        if "topics" in p or "tenants" in p:
            wants = self._event_filter(p)
            events = [e for e in events if wants(e)]
        return events[-p.get("limit", 100) :]

    async def metrics(self, params: dict[str, Any]) -> str:
        """Prometheus text exposition (``metrics.CONTENT_TYPE``), read in the slow-I/O
        pool: a render reads every partition's counters."""
        _params(params)
        return await self.daemon.blocking(self.exporter.render)

    def _event_filter(self, p: dict[str, Any]) -> EventFilter:
        return EventFilter(names_param(p, "topics"), names_param(p, "tenants"), self._tenant_paths)

    def _tenant_paths(self) -> dict[str, str]:
        config = self.daemon.config  # a reload may replace it: follow the live one
        if config is not self._paths_for:
            self._paths = {t.name: t.path for t in config.tenants}
            self._paths_for = config
        return self._paths

    async def subscribe(self, params: dict[str, Any], conn: Connection) -> Streaming:
        p = _params(params, topics=(list, False), tenants=(list, False))
        if self.subscribers is None:
            self.subscribers = Subscribers(
                self.daemon.events, lambda: self.daemon.config.daemon.subscriber_queue
            )
        return self.subscribers.subscribe(conn, self._event_filter(p))

    async def unsubscribe(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        _params(params)
        if self.subscribers is None:
            raise RpcError(ErrorCode.INVALID_STATE, "this connection is not subscribed")
        return await self.subscribers.unsubscribe(conn)

    async def reload(self, params: dict[str, Any]) -> dict[str, Any]:
        p = _params(params, dry_run=(bool, False))
        return await self.daemon.live.reload(dry_run=p.get("dry_run", False))

    async def set_limits(self, params: dict[str, Any]) -> dict[str, Any]:
        p = _params(params, partition=(str, True), memory=(dict, False), cpu=(dict, False),
                    pids=(int, False))  # fmt: skip
        try:
            figures = parse_set(p.get("memory"), p.get("cpu"), p.get("pids"))
        except BadLimits as exc:
            raise RpcError(ErrorCode.BAD_REQUEST, str(exc)) from None
        return await self.daemon.live.set_limits(p["partition"], figures)

    async def shutdown(self, params: dict[str, Any]) -> str:
        _params(params)
        self.daemon.request_shutdown()
        return "shutting down"

    async def reexec(self, params: dict[str, Any]) -> dict[str, Any]:
        """Re-execute the daemon in place (docs/operations.md, "Upgrades and restarts"):
        answered first, then the connection closes with the old image."""
        _params(params)
        self.daemon.request_reexec()
        return {"pid": os.getpid(), "reexec": "started"}


_REFUSAL = {
    "bad_request": ErrorCode.BAD_REQUEST,
    "not_found": ErrorCode.NOT_FOUND,
    "refused": ErrorCode.PERMISSION_DENIED,
}
