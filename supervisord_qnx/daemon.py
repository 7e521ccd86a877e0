"""Wires the pieces: config -> partition tree -> backend -> supervisor -> control socket.

Start-up order matters and is the same every time:

1. validate everything (config, admission, backend checks, enforcement) and
   refuse to start on any problem: nothing is created from a bad config;
2. take exclusive ownership of the state directory and the partition root
   (``ownership.py``): a second daemon on either refuses here, having touched nothing;
3. give back processes a crashed predecessor had attached (``attached.py``), then
   reap what it left behind in our own partitions;
4. create the partitions, parents first;
5. serve the control socket (refusing if another daemon is live on it);
6. start autostart tenants, then tell the service manager we are ready.

Shutdown (SIGTERM, SIGINT or the ``shutdown`` method) runs it backwards:
tenants stopped concurrently within their timeouts (each only after the
tenants ``after`` it), attached processes given back (not killed, unless
attached with ``own``), partitions removed deepest first while the runtime
state is written a last time, the log writers waited for (supervise/shutdown.py),
socket removed, locks released, exit 0.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog
import trio

from supervisord_qnx import attached, memtrim, safedirs, sdnotify, userdb
from supervisord_qnx.config.load import ConfigError, Located
from supervisord_qnx.config.model import Config
from supervisord_qnx.control.methods import Methods
from supervisord_qnx.control.metrics import write_textfile
from supervisord_qnx.control.server import AlreadyRunning, ServeError, serve
from supervisord_qnx.ownership import InUse, Ownership
from supervisord_qnx.partition import tree as ptree
from supervisord_qnx.partition.backend import Backend, Enforcement, unenforced
from supervisord_qnx.safedirs import UnsafePath
from supervisord_qnx.supervise import adopt, leftovers, statebody
from supervisord_qnx.supervise import state as runtime_state
from supervisord_qnx.supervise.events import EventBus
from supervisord_qnx.supervise.jobs import Jobs
from supervisord_qnx.supervise.reaper import ChildReaper, become_subreaper
from supervisord_qnx.supervise.reload import LiveChanges
from supervisord_qnx.supervise.supervisor import Supervisor
from supervisord_qnx.supervise.worker import State

log = structlog.get_logger("supervisord_qnx.daemon")

T = TypeVar("T")

# Threads for slow backend calls and file reads made on behalf of control requests
# (logs, partitions, attach, detach): their own small pool, so that a burst of such
# requests waits here and never takes the threads that spawns and stops run in
# (trio's default limiter).
SLOW_IO_THREADS = 4
# At shutdown, how long the daemon waits for its log writers to write out what they hold
# once every worker is gone (a writer waits for room on a full disk meanwhile).
LOG_WRITERS_WAIT = 2.0


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


CONFIG_HASH = "{config_hash}"


def cgroup_root(config: Config) -> str | None:
    """``daemon.cgroup_root`` with ``{config_hash}`` replaced by 8 hex digits of the
    SHA-256 of the config file's resolved directory: two checkouts of one config (two
    ``make run``) then get different roots, while one checkout always gets the same."""
    root = config.daemon.cgroup_root
    if root is None or CONFIG_HASH not in root:
        return root
    import hashlib

    where = str(Path(config.path).resolve().parent).encode()
    return root.replace(CONFIG_HASH, hashlib.sha256(where).hexdigest()[:8])


def make_backend(config: Config, override: str | None = None) -> Backend:
    """Pick and construct the backend (raises ``BackendUnavailable`` with the reason)."""
    from supervisord_qnx.partition.detect import choose_backend

    return choose_backend(
        override or config.daemon.backend,
        cgroup_root=cgroup_root(config),
        sample_interval=config.daemon.sample_interval,
    )


# Descriptors, estimated generously: the daemon's own (epoll, signals, wake-up pipes,
# the listening socket, a spawn's log file and pipes in flight), one per control
# connection we allow, and what the backend keeps open per partition and per worker
# (cgroup1: an eventfd per watched file, OOM for each leaf and partition plus a pressure
# threshold; cgroup2: an open memory.events per leaf and partition; portable: the
# sampler's two /proc files per worker, partition/procfiles.py; qnx: none).
FDS_BASE = 64
FDS_CONNECTIONS = 256
FDS_PER_WORKER = {"cgroup1": 3, "cgroup2": 2, "portable": 2}
FDS_PER_PARTITION = {"cgroup1": 2, "cgroup2": 1}
# However many descriptors there are, more control clients than this at once is a leak
# or an attack, not operators; each one costs a task and buffers.
MAX_CONNECTIONS = 4096


def fd_needs(config: Config, backend_name: str, partitions: int) -> int:
    """How many descriptors the daemon may hold at once for ``config`` (an estimate)."""
    workers = sum(w.instances for t in config.tenants for w in t.worker)
    per_worker = FDS_PER_WORKER.get(backend_name, 0) + 1  # + the log fd during a spawn
    return (
        FDS_BASE
        + FDS_CONNECTIONS
        + workers * per_worker
        + partitions * FDS_PER_PARTITION.get(backend_name, 0)
    )


def raise_fd_limit(need: int) -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to twice what the config needs (at most the hard
    limit); return the new (soft, hard).

    Not straight to the hard limit: workers inherit the soft limit, and a program that
    closes every descriptor up to it, or uses select(), should meet what a service
    usually gets (1024, or what the service manager set), not the hard limit (often
    half a million)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 2 * need if hard == resource.RLIM_INFINITY else min(hard, 2 * need)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. a hard limit over the kernel's nr_open
            log.warning("could not raise the descriptor limit", soft=soft, hard=hard,
                        error=str(exc))  # fmt: skip
    return soft, hard


def fd_limit_problem(config: Config, backend_name: str, partitions: int) -> str | None:
    """A warning when the hard ``RLIMIT_NOFILE`` is below what ``config`` needs."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = fd_needs(config, backend_name, partitions)
    if hard == resource.RLIM_INFINITY or hard >= need:
        return None
    workers = sum(w.instances for t in config.tenants for w in t.worker)
    return (
        f"the descriptor limit (RLIMIT_NOFILE, hard) is {hard}, below the about {need} "
        f"this config needs ({workers} workers and {partitions} partitions on "
        f"{backend_name}, plus {FDS_CONNECTIONS} control connections and {FDS_BASE} for "
        f"the daemon); raise it (systemd LimitNOFILE=, ulimit -Hn) or spawns and control "
        f"connections will fail with 'Too many open files'"
    )


def admit(config: Config, backend: Backend) -> tuple[ptree.PartitionTree, list[str]]:
    """Run the backend's own checks and the enforcement policy on the tree ``load``
    admitted.

    Returns the tree and warnings (unenforced controls under best-effort);
    raises ``ConfigError`` when the daemon must not start.
    """
    tree = config.tree
    located = [
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
                    str(config.file_for(path)),
                    str(control),
                    message + ' (set [daemon] enforcement = "best-effort" to run anyway)',
                )
            )
        else:
            warnings.append(message)
    if located:
        raise ConfigError(located)
    return tree, warnings


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
        backend.use_utility_runner(self.reaper.run_utility)
        backend.use_orphan_source(self.reaper.orphans)
        self.supervisor = Supervisor(config, tree, backend, self.reaper, self.events)
        self.jobs = Jobs(
            tree,
            backend,
            self.reaper,
            self.supervisor.launchers,
            self.events,
            log_dir=Path(config.daemon.log_dir),
            enforcement=config.daemon.enforcement,
            daemon_spec=config.daemon,
        )
        self.io_backend = "native"
        self._shutdown = trio.Event()
        self.ready = trio.Event()
        self.stopped = trio.Event()
        self.created: list[str] = []
        self.slow_io = trio.CapacityLimiter(SLOW_IO_THREADS)
        self.attached = attached.Registry(Path(config.daemon.state_dir))
        self.ownership = Ownership()
        self.max_connections: int | None = None
        # Reload and runtime limits (supervise/reload.py); its lock also orders shutdown.
        self.live = LiveChanges(self, admit, self.jobs)
        self._nursery: trio.Nursery | None = None
        # The runtime state (supervise/state.py), rewritten after every change, and
        # what this start found of a previous daemon (supervise/adopt.py).
        self._state_body = statebody.StateBody()
        self.state = runtime_state.StateKeeper(
            Path(config.daemon.state_dir), self._snapshot, self._snapshot_in_steps
        )
        self.supervisor.on_change = self.state.changed
        self.events.listeners.append(self.state.changed)
        # Free heap pages go back to the system after each burst of events (memtrim.py).
        self.trimmer = memtrim.Trimmer()
        self.events.listeners.append(self.trimmer.changed)
        self.plan = adopt.Plan()
        self._reexec_requested = False

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run slow backend work or file I/O for a control request in the ``slow_io`` pool."""
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self.slow_io
        )

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config.daemon
        # Before touching any partition: a live daemon on our socket owns them, and so
        # does whoever holds the locks (reaping "leftovers" would kill its workers).
        _refuse_if_live(Path(cfg.socket))
        # Before anything is written into them (the lock, logs, the socket).
        await trio.to_thread.run_sync(secure_dirs, self.config)
        roots = self.backend.lock_paths()
        await trio.to_thread.run_sync(self.ownership.take, Path(cfg.state_dir), roots)
        try:
            self._size_fds()
            for w in self.warnings:
                log.warning("unenforced control", detail=w)
            self.supervisor.launchers.enable_prefork(become_subreaper())
            for d in (cfg.state_dir, cfg.log_dir):
                await trio.Path(d).mkdir(parents=True, exist_ok=True)
            await trio.to_thread.run_sync(self._give_back_attached)
            began = time.monotonic()
            self.plan = await trio.to_thread.run_sync(self._plan_adoption)
            reaped = await trio.to_thread.run_sync(
                self.backend.reap_leftovers_keeping, self.plan.keep
            )
        except BaseException:
            self.ownership.release()
            raise
        if reaped:
            log.warning("reaped leftovers of a previous run", partitions=reaped)
        stopped_cleanly = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.reaper.run)
                await trio.to_thread.run_sync(self._create_partitions)
                await nursery.start(self.supervisor.run)
                changed = await adopt.apply(
                    self.plan, self.supervisor, self.backend, self.reaper, nursery
                )
                if self.plan.adopt or self.plan.lost or self.plan.backoff:
                    log.info("carried on from the previous daemon", adopted=len(self.plan.adopt),
                             lost=len(self.plan.lost), backoff=len(self.plan.backoff),
                             reexec=self.plan.reexec,
                             seconds=round(time.monotonic() - began, 3))  # fmt: skip
                await self._restore_overrides(self.plan.overrides)
                await nursery.start(self.state.run)
                self.state.changed()
                await nursery.start(self.jobs.run)
                nursery.start_soon(self.supervisor.watch_backend)
                methods = Methods(self)
                await nursery.start(
                    lambda task_status: serve(
                        Path(cfg.socket),
                        methods.dispatch,
                        mode=cfg.socket_mode,
                        max_message_bytes=cfg.max_message_bytes,
                        max_connections=self.max_connections,
                        task_status=task_status,
                        **server_limits(self.config),
                    )
                )
                nursery.start_soon(self._signals)
                if cfg.metrics_textfile is not None:
                    nursery.start_soon(
                        write_textfile,
                        methods.exporter,
                        cfg.metrics_textfile,
                        cfg.metrics_interval,
                        self.blocking,
                    )
                log.info(
                    "daemon started",
                    pid=os.getpid(),
                    socket=str(cfg.socket),
                    backend=self.backend.name,
                    tenants=len(self.supervisor.tenants),
                    partitions=len(self.tree),
                )
                await self.supervisor.start_autostart()
                if changed:
                    log.info("restarting adopted workers whose definition changed",
                             workers=[i.name for i in changed])  # fmt: skip
                    await self.supervisor.restart_instances(changed)
                self.ready.set()
                _notify(f"{sdnotify.READY}\nSTATUS=tenants started")
                nursery.start_soon(self.trimmer.run)
                self.trimmer.changed()  # what start-up alone freed
                nursery.start_soon(_watchdog)
                task_status.started(self)
                while True:
                    await self._shutdown.wait()
                    if not self._reexec_requested:
                        break
                    self._reexec_requested = False
                    self._shutdown = trio.Event()
                    await self._reexec()
                log.info("shutting down")
                _notify(sdnotify.STOPPING)
                self.state.hold()  # written once, when everything stopped
                await self.jobs.stop_all()
                async with self.live.lock:  # a reload in progress finishes first
                    # Stopped workers leave their leaves to _destroy_partitions below.
                    self.supervisor.shutdown.begin()
                    await self.supervisor.stop_all()
                await self.supervisor.shutdown.stop_launchers(self.supervisor.launchers)
                # The operator's decisions outlive a clean stop too: written below,
                # beside the partitions' removal (nothing can change any more then).
                stopped_cleanly = True
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as last:
                    last.start_soon(trio.to_thread.run_sync, self._destroy_partitions)
                    if stopped_cleanly:
                        last.start_soon(self._write_state_final)
                # Last: every line of every run is in its files (supervise/shutdown.py).
                await self.supervisor.shutdown.writers_ended(self.reaper, LOG_WRITERS_WAIT)
                self.backend.close()
                self.ownership.release()
            self.stopped.set()
            log.info("daemon stopped")

    def _create_partitions(self) -> None:
        """Create the tree, parents first (as it iterates). Blocking: one worker thread
        for the whole tree, not a thread hop per partition (1001 of them at N = 1000)."""
        for node in self.tree:
            self.backend.create(node)
            self.created.append(node.path)

    def _snapshot(self) -> dict[str, Any]:
        # Each worker's part kept as text, made again only when it changed: a whole
        # snapshot held the loop for 19-27 ms at N = 1000 (supervise/statebody.py).
        return statebody.snapshot(self._state_body, self.supervisor, self.live.overrides.to_dict())

    async def _snapshot_in_steps(self, pause: Callable[[], Awaitable[None]]) -> dict[str, Any]:
        return await statebody.snapshot_in_steps(
            self._state_body, self.supervisor, self.live.overrides.to_dict, pause
        )

    async def _write_state_final(self) -> None:
        await self._write_state_last("shutdown")
        f = self.state.figures
        log.info("runtime state writes", writes=f.writes, changes=f.changes,
                 last_seconds=round(f.last_seconds, 4),
                 max_seconds=round(f.max_seconds, 4))  # fmt: skip

    async def _write_state_last(self, reason: str) -> None:
        try:
            await self.state.write_now(reason)
        except OSError as exc:
            log.error("cannot write the runtime state", error=str(exc))

    def _plan_adoption(self) -> adopt.Plan:
        """Read the previous daemon's state and decide what to adopt; stop what must not
        run on (removed tenants, ``on_restart = "restart"``). Blocking."""
        body = runtime_state.load(Path(self.config.daemon.state_dir))
        plan = adopt.make_plan(body, self.supervisor, self.backend, self.config.daemon.on_restart)
        for a in plan.adopt:
            if a.child:
                # Still our child (a reexec): claimed before the reaper's first sweep,
                # which would otherwise take its status as an orphan's.
                self.reaper.register(a.pid)
        if plan.stop:
            stopped = adopt.stop_leftovers(plan)
            if stopped:
                log.warning("stopped workers of the previous daemon that are not adopted",
                            pids=stopped, on_restart=self.config.daemon.on_restart)  # fmt: skip
        if self.backend.name == "portable":
            # Spawned too late to be recorded: nothing but their environment names them.
            leftovers.stop(self.supervisor.owner, plan.keep, adopt.LEFTOVER_STOP_WAIT)
        return plan

    async def _restore_overrides(self, overrides: dict[str, Any]) -> None:
        """Figures set with ``set`` before the restart apply again (until a reload)."""
        from supervisord_qnx.partition.limits import WIRE_TO_FIGURE

        for path, figures in overrides.items():
            try:
                attrs = {WIRE_TO_FIGURE[k]: v for k, v in figures.items()}
                await self.live.set_limits(path, attrs)
            except Exception as exc:  # noqa: BLE001 - one partition's figures, not the start
                log.error("a runtime limit could not be set again; the files' figures apply",
                          partition=path, error=str(exc))  # fmt: skip

    def request_reexec(self) -> None:
        """Re-execute the daemon (``reexec``, SIGUSR2) once the caller's answer is sent."""
        self._reexec_requested = True
        self._shutdown.set()

    async def _reexec(self) -> None:
        """Save the state and ``execve`` this same program (same pid: the service manager
        sees no change); the new image adopts the workers, still its children. Every
        descriptor the daemon opened is close-on-exec (PEP 446): sockets, pipes, the
        ownership locks (released by the exec, taken again by the new image)."""
        _notify(sdnotify.RELOADING)
        await trio.sleep(0.05)  # the answer to a `reexec` call reaches its client
        async with self.live.lock:  # a reload in progress finishes first
            # A spawn under way would leave a child the record does not name: wait for
            # it to be recorded (spawns take milliseconds; a stuck one, 5 s at most).
            with trio.move_on_after(5.0):
                while self._spawn_under_way():  # noqa: ASYNC110 - no event covers both
                    await trio.sleep(0.005)
            argv = [sys.executable, *sys.orig_argv[1:]]
            log.info("re-executing", argv=argv)
            try:
                # No checkpoint between the snapshot and the exec: nothing changes.
                self.state.write_sync("reexec")
                os.execv(sys.executable, argv)
            except OSError as exc:
                log.error("reexec failed; the daemon runs on", error=str(exc))
                _notify(sdnotify.READY)

    def _spawn_under_way(self) -> bool:
        if self.reaper.spawns_in_flight:
            return True
        return any(
            inst.performing and inst.lc.pid is None and inst.lc.state is State.STARTING
            for tenant in self.supervisor.tenants.values()
            for inst in tenant.instances
        )

    def _size_fds(self) -> None:
        """Raise the descriptor limit, warn if it is still short, and cap connections so
        that idle clients can never take the descriptors spawns and backends need."""
        need = fd_needs(self.config, self.backend.name, len(self.tree))
        soft, _ = raise_fd_limit(need)
        problem = fd_limit_problem(self.config, self.backend.name, len(self.tree))
        if problem:
            log.warning("descriptor limit too low", detail=problem)
        own = need - FDS_CONNECTIONS
        self.max_connections = max(8, min(soft - own, MAX_CONNECTIONS))
        if self.config.control.max_connections is not None:
            self.max_connections = min(self.max_connections, self.config.control.max_connections)

    def _give_back_attached(self) -> None:
        """Processes a crashed predecessor attached are not leftovers: detach them (back
        where they were) before reaping, unless they were handed over with ``own``."""
        for entry in self.attached.load():
            if entry.own or not entry.same_process():
                continue
            try:
                self.backend.detach(entry.pid, entry.previous)
                log.warning("gave back a process attached by a previous run", pid=entry.pid,
                            partition=entry.partition)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - one pid's failure must not stop the rest
                log.error("could not detach a process attached by a previous run",
                          pid=entry.pid, error=str(exc))  # fmt: skip
        self.attached.entries.clear()
        self.attached.save()

    def _release_attached(self) -> None:
        """At shutdown: attached processes go back where they were, alive; those attached
        with ``own`` stay, and are killed with their partition."""
        for entry in list(self.attached.entries.values()):
            if entry.own:
                continue
            if entry.same_process():
                try:
                    self.backend.detach(entry.pid, entry.previous)
                    log.info("detached an attached process", pid=entry.pid,
                             partition=entry.partition)  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - shutdown gives back every other pid
                    log.error("could not detach an attached process", pid=entry.pid,
                              error=str(exc))  # fmt: skip
                    continue
            self.attached.drop(entry.pid)

    def _destroy_partitions(self) -> None:
        self._release_attached()

        # What was created, not what the tree holds: a reload cut short creates first and
        # replaces the tree last. Deepest first, all at once where the backend can (the
        # workers stopped by the shutdown left their leaves to this: supervise/shutdown.py).
        for path, exc in self.backend.destroy_all(list(self.created)):
            log.error("could not remove partition", partition=path, error=str(exc))

    async def _signals(self) -> None:
        watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
        with trio.open_signal_receiver(*watched) as signals:
            async for signum in signals:
                if signum == signal.SIGUSR2:
                    log.info("signal received: re-executing", signal="SIGUSR2")
                    self.request_reexec()
                    continue
                if signum == signal.SIGHUP:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._reload_on_signal)
                    continue
                log.info("signal received", signal=signal.Signals(signum).name)
                self.request_shutdown()

    async def _reload_on_signal(self) -> None:
        """SIGHUP: reload as the ``reload`` method does; problems go to the log (and the
        ``reload`` event), and the daemon runs on unchanged."""
        _notify(sdnotify.RELOADING)
        try:
            await self.live.reload()
        except ConfigError as exc:
            log.error("reload refused; nothing changed",
                      problems=[str(p) for p in exc.problems])  # fmt: skip
        except Exception:
            log.exception("reload failed")
        finally:
            _notify(sdnotify.READY)


def daemon_umask(config: Config) -> int:
    """The umask the daemon sets for itself: nothing it creates is for others, except
    read access for the socket's group where one is configured."""
    return 0o077 if config.daemon.socket_group is None else 0o027


STATE_DIR_MODE = 0o711


def secure_dirs(config: Config) -> None:
    """Create or check the socket, state and log directories (``safedirs.py``); raises
    ``UnsafePath`` if someone else could tamper with one."""
    cfg = config.daemon
    # 0711, not 0700: unprivileged workers must reach their own notify socket and wasm
    # report file in it by path (each 0600 and owned by that worker's uid, in
    # subdirectories only the daemon can write); others can pass through, never list.
    state = safedirs.secure_dir(cfg.state_dir, mode=STATE_DIR_MODE)
    st = os.lstat(state)
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o011 != 0o011:
        os.chmod(state, stat.S_IMODE(st.st_mode) | 0o011)  # made 0700 by an older version
    safedirs.secure_dir(cfg.log_dir)
    group = None if cfg.socket_group is None else userdb.gid_of(cfg.socket_group)
    mode = 0o700 if group is None else 0o750
    safedirs.secure_dir(Path(cfg.socket).parent, mode=mode, group=group, socket_dir=True)


def server_limits(config: Config) -> dict[str, Any]:
    """The control server's settings from ``[control]`` and ``socket_group``."""
    control = config.control
    group = config.daemon.socket_group
    return {
        "group": None if group is None else userdb.gid_of(group),
        "max_in_flight": control.max_in_flight,
        "partial_frame_timeout": control.frame_timeout,
        "idle_timeout": control.idle_timeout,
        "max_connections_per_uid": control.max_connections_per_uid,
        "max_elements": control.max_elements,
        "max_depth": control.max_depth,
        "decode_budget": control.decode_budget,
    }


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


_notify_failures: set[str] = set()


def _notify(state: str) -> None:
    """Tell the service manager ``state``; a manager we cannot reach is worth a warning,
    never an exit (the tenants are running either way). Each distinct failure is logged
    once, so a watchdog ping every few seconds does not flood the log."""
    try:
        sdnotify.notify(state)
    except (OSError, ValueError) as exc:
        # OSError: the manager went away or the path is unusable; ValueError
        # (sdnotify.UnsupportedAddress): e.g. a vsock: address systemd gives a VM's service.
        if str(exc) not in _notify_failures:
            _notify_failures.add(str(exc))
            log.warning(
                "sd_notify failed; the service manager will not hear from this daemon",
                state=state.splitlines()[0],
                error=str(exc),
            )
    else:
        _notify_failures.clear()


async def _watchdog() -> None:
    period = sdnotify.watchdog_period()
    if not period:
        return
    while True:
        _notify(sdnotify.WATCHDOG)
        await trio.sleep(period)


__all__ = [
    "AlreadyRunning",
    "ConfigError",
    "Daemon",
    "Enforcement",
    "InUse",
    "ServeError",
    "UnsafePath",
    "admit",
    "configure_logging",
    "make_backend",
]
