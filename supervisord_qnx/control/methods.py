"""The daemon's control methods: names, parameters, results.

Each handler takes the request's named params (already a dict) and returns
plain data, or raises ``RpcError``. Parameters are checked here, strictly:
an unknown or mistyped parameter is ``bad_request`` naming it, because a
script that misspells ``wait`` should hear so, not silently not wait.
"""

from __future__ import annotations

import platform
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from supervisord_qnx import __version__
from supervisord_qnx.control.rpc import ErrorCode, RpcError
from supervisord_qnx.partition.backend import BackendError
from supervisord_qnx.supervise.supervisor import NotFound

if TYPE_CHECKING:
    from supervisord_qnx.daemon import Daemon

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


class Methods:
    """The method table the control server dispatches to."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.table: dict[str, Handler] = {
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
            "shutdown": self.shutdown,
        }

    async def dispatch(self, method: str, params: dict[str, Any], conn: object = None) -> Any:
        handler = self.table.get(method)
        if handler is None:
            raise RpcError(
                ErrorCode.UNKNOWN_METHOD,
                f"no method {method!r}; methods: {', '.join(sorted(self.table))}",
            )
        try:
            return await handler(params)
        except NotFound as exc:
            raise RpcError(ErrorCode.NOT_FOUND, str(exc)) from None
        except BackendError as exc:
            raise RpcError(ErrorCode.BACKEND_ERROR, str(exc)) from None

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

    async def status(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        p = _params(params, tenant=(str, False))
        sup = self.daemon.supervisor
        await sup.refresh_counters()
        return sup.status(p.get("tenant"))

    async def partitions(self, params: dict[str, Any]) -> dict[str, Any]:
        _params(params)
        return await self.daemon.partitions_report()

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
        out = []
        for inst in sup.find_instances(p["tenant"], p.get("worker")):
            path = sup.log_path(inst)
            text = await trio.to_thread.run_sync(_tail, path, lines)
            out.append({"worker": inst.name, "file": str(path), "lines": text})
        return out

    async def attach(self, params: dict[str, Any]) -> dict[str, Any]:
        p = _params(params, partition=(str, True), pid=(int, True))
        if p["partition"] not in self.daemon.tree or not p["partition"]:
            raise RpcError(ErrorCode.NOT_FOUND, f"no partition {p['partition']!r}")
        try:
            await trio.to_thread.run_sync(self.daemon.backend.attach, p["partition"], p["pid"])
        except ProcessLookupError:
            raise RpcError(ErrorCode.NOT_FOUND, f"no process {p['pid']}") from None
        except OSError as exc:
            raise RpcError(ErrorCode.BACKEND_ERROR, f"attach {p['pid']}: {exc}") from None
        return {"partition": p["partition"], "pid": p["pid"]}

    async def detach(self, params: dict[str, Any]) -> dict[str, Any]:
        p = _params(params, pid=(int, True))
        try:
            await trio.to_thread.run_sync(self.daemon.backend.detach, p["pid"])
        except ProcessLookupError:
            raise RpcError(ErrorCode.NOT_FOUND, f"no process {p['pid']}") from None
        except OSError as exc:
            raise RpcError(ErrorCode.BACKEND_ERROR, f"detach {p['pid']}: {exc}") from None
        return {"pid": p["pid"]}

    async def recent_events(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        p = _params(params, limit=(int, False), kind=(str, False))
        events = list(self.daemon.events.history)
        if "kind" in p:
            events = [e for e in events if e["kind"] == p["kind"]]
        return events[-p.get("limit", 100) :]

    async def shutdown(self, params: dict[str, Any]) -> str:
        _params(params)
        self.daemon.request_shutdown()
        return "shutting down"


def _tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a log file, reading backwards from the end in blocks."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            end = f.tell()
            block, data = 8192, b""
            while end > 0 and data.count(b"\n") <= lines:
                start = max(0, end - block)
                f.seek(start)
                data = f.read(end - start) + data
                end = start
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", "replace").splitlines()
    return text[-lines:]
