"""Wires the pieces: config -> partition tree -> backend -> supervisor -> control socket.

Start-up order matters and is the same every time:

1. validate everything (config, admission, backend checks, enforcement) and
   refuse to start on any problem: nothing is created from a bad config;
2. reap what a previous, dead daemon left behind in our own partitions;
3. create the partitions, parents first;
4. serve the control socket (refusing if another daemon is live on it);
5. start autostart tenants, then tell the service manager we are ready.

Shutdown (SIGTERM, SIGINT or the ``shutdown`` method) runs it backwards:
tenants stopped in reverse start order within their timeouts, partitions
removed deepest first, socket removed, exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import structlog
import trio

from supervisord_qnx import sdnotify
from supervisord_qnx.config.load import ConfigError, Located
from supervisord_qnx.config.model import Config
from supervisord_qnx.control.server import AlreadyRunning, ServeError
from supervisord_qnx.partition import tree as ptree
from supervisord_qnx.partition.backend import Backend, Enforcement, unenforced
from supervisord_qnx.supervise.events import EventBus
from supervisord_qnx.supervise.reaper import ChildReaper, become_subreaper
from supervisord_qnx.supervise.supervisor import Supervisor

log = structlog.get_logger("supervisord_qnx.daemon")


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def make_backend(config: Config, override: str | None = None) -> Backend:
    """Pick and construct the backend (raises ``BackendUnavailable`` with the reason)."""
    from supervisord_qnx.partition.detect import choose_backend

    return choose_backend(
        override or config.daemon.backend,
        cgroup_root=config.daemon.cgroup_root,
        sample_interval=config.daemon.sample_interval,
    )


def admit(config: Config, backend: Backend) -> tuple[ptree.PartitionTree, list[str]]:
    """Build the tree and run the backend's own checks and the enforcement policy.

    Returns the tree and warnings (unenforced controls under best-effort);
    raises ``ConfigError`` when the daemon must not start.
    """
    tree, problems = ptree.build(config.partitions, config.tenants)
    located = [
        Located(str(config.path), f"partition '{p.partition}'.{p.key}", p.reason) for p in problems
    ]
    located += [
        Located(str(config.path), f"daemon.backend={backend.name}", reason)
        for reason in backend.check(tree)
    ]
    warnings = []
    for path, control in unenforced(backend, tree):
        message = (
            f"partition '{path}' asks for {control}, "
            f"which the {backend.name} backend does not enforce"
        )
        if config.daemon.enforcement == "strict":
            located.append(
                Located(
                    _file_for(config, path),
                    str(control),
                    message + ' (set [daemon] enforcement = "best-effort" to run anyway)',
                )
            )
        else:
            warnings.append(message)
    if located:
        raise ConfigError(located)
    return tree, warnings


def _file_for(config: Config, path: str) -> str:
    for t in config.tenants:
        if t.path == path:
            return str(config.tenant_files[t.name])
    return str(config.path)


def enforcement_table(backend: Backend) -> dict[str, str]:
    return {str(c): str(e) for c, e in backend.enforcement().items()}


class Daemon:
    def __init__(
        self, config: Config, backend: Backend, tree: ptree.PartitionTree, warnings: list[str]
    ) -> None:
        self.config = config
        self.backend = backend
        self.tree = tree
        self.warnings = warnings
        self.events = EventBus()
        self.reaper = ChildReaper()
        # A backend that runs helper commands (QNX's aps/on) must run them through the
        # reaper, whose orphan sweep would otherwise take their exit statuses.
        set_runner = getattr(backend, "set_utility_runner", None)
        if set_runner is not None:
            set_runner(self.reaper.run_utility)
        self.supervisor = Supervisor(config, tree, backend, self.reaper, self.events)
        self.io_backend = "native"
        self._shutdown = trio.Event()
        self.ready = trio.Event()
        self.stopped = trio.Event()
        self.created: list[str] = []

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def partitions_report(self) -> dict[str, Any]:
        stats = {}
        for node in self.tree:
            try:
                s = await trio.to_thread.run_sync(self.backend.stats, node.path)
            except Exception as exc:  # a stats failure must not break the report
                stats[node.path] = {"error": str(exc)}
                continue
            figures = {k: v for k, v in vars(s).items() if k != "pids"}
            figures["pids"] = s.pids[:64]
            stats[node.path] = figures
        mapping = self.backend.describe(self.tree)
        unenforced_list = [
            {"partition": p, "control": str(c)} for p, c in unenforced(self.backend, self.tree)
        ]

        def decorate(node: dict[str, Any]) -> dict[str, Any]:
            node["usage"] = stats.get(node["path"])
            node["os_name"] = mapping.get(node["path"])
            node["children"] = [decorate(c) for c in node["children"]]
            return node

        return {
            "backend": self.backend.name,
            "enforcement": enforcement_table(self.backend),
            "unenforced": unenforced_list,
            "tree": decorate(self.tree.as_dict()),
        }

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        from supervisord_qnx.control.server import serve

        cfg = self.config.daemon
        # Before touching any partition: a live daemon on our socket owns them.
        _refuse_if_live(Path(cfg.socket))
        for w in self.warnings:
            log.warning("unenforced control", detail=w)
        self.supervisor.launchers.enable_prefork(become_subreaper())
        for d in (cfg.state_dir, cfg.log_dir):
            Path(d).mkdir(parents=True, exist_ok=True)
        reaped = await trio.to_thread.run_sync(self.backend.reap_leftovers)
        if reaped:
            log.warning("reaped leftovers of a previous run", partitions=reaped)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.reaper.run)
                for node in self.tree:
                    await trio.to_thread.run_sync(self.backend.create, node)
                    self.created.append(node.path)
                await nursery.start(self.supervisor.run)
                nursery.start_soon(self.supervisor.watch_backend)
                methods = _methods(self)
                await nursery.start(
                    lambda task_status: serve(
                        Path(cfg.socket),
                        methods.dispatch,
                        mode=cfg.socket_mode,
                        max_message_bytes=cfg.max_message_bytes,
                        task_status=task_status,
                    )
                )
                nursery.start_soon(self._signals)
                log.info(
                    "daemon started",
                    pid=os.getpid(),
                    socket=str(cfg.socket),
                    backend=self.backend.name,
                    tenants=len(self.supervisor.tenants),
                    partitions=len(self.tree),
                )
                await self.supervisor.start_autostart()
                self.ready.set()
                _notify("READY=1\nSTATUS=tenants started")
                nursery.start_soon(_watchdog)
                task_status.started(self)
                await self._shutdown.wait()
                log.info("shutting down")
                _notify("STOPPING=1")
                await self.supervisor.stop_all()
                await self.supervisor.launchers.stop()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._destroy_partitions)
                self.backend.close()
            self.stopped.set()
            log.info("daemon stopped")

    def _destroy_partitions(self) -> None:
        for node in self.tree.deepest_first():
            if node.path in self.created:
                try:
                    self.backend.destroy(node.path)
                except Exception as exc:
                    log.error("could not remove partition", partition=node.path, error=str(exc))

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    _notify("RELOADING=1")
                    _notify("READY=1")
                    log.warning("reload (SIGHUP) is not implemented yet; configuration unchanged")
                    continue
                log.info("signal received", signal=signal.Signals(signum).name)
                self.request_shutdown()


def _refuse_if_live(path: Path) -> None:
    """Refuse before touching any partition: a live daemon on our socket owns them (and
    reaping "leftovers" would kill its workers). The server checks again when it binds."""
    import socket as _socket

    if not path.exists():
        return
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        return  # stale: the server replaces it
    finally:
        s.close()
    raise AlreadyRunning(path)


def _methods(daemon: Daemon) -> Any:
    from supervisord_qnx.control.methods import Methods

    return Methods(daemon)


def _notify(state: str) -> None:
    try:
        sdnotify.notify(state)
    except OSError as exc:  # the service manager went away; keep supervising
        log.warning("sd_notify failed", state=state, error=str(exc))


async def _watchdog() -> None:
    period = sdnotify.watchdog_period()
    if not period:
        return
    while True:
        _notify("WATCHDOG=1")
        await trio.sleep(period)


__all__ = [
    "AlreadyRunning",
    "ConfigError",
    "Daemon",
    "Enforcement",
    "ServeError",
    "admit",
    "configure_logging",
    "make_backend",
]
