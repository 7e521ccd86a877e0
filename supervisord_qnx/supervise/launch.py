"""Launchers: how one kind of worker becomes a process, and what its process says when it
ends. The supervisor knows workers only through this interface; everything particular to
a kind (a command's argv; the wasm runner's arguments, report file, memory cap and fork
server) lives here.

Threading: ``spawn`` and ``exit_reason`` are async and do their blocking work (files,
fork, the fork server's socket) in worker threads; ``status_fields`` is called on the
event loop and only reads memory.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Any, ClassVar

import structlog
import trio

from supervisord_qnx.config.model import CommandWorker, DaemonSpec, WasmWorker, WorkerBase
from supervisord_qnx.exits import ExitReason
from supervisord_qnx.partition.backend import Backend, SpawnRequest
from supervisord_qnx.partition.tree import PartitionTree
from supervisord_qnx.supervise import confine, spawnthreads
from supervisord_qnx.supervise.logserver import WriterServer
from supervisord_qnx.supervise.prefork import ForkServerKeeper
from supervisord_qnx.supervise.reaper import ChildReaper
from supervisord_qnx.wasm.forkserver import ForkServerGone
from supervisord_qnx.wasm.runner_args import RunnerArgs

log = structlog.get_logger("supervisord_qnx.launch")

# Resident size of a wasm runner itself (interpreter + wasmtime + compiled code),
# subtracted from a partition's max for the default linear-memory cap.
# bench/bench_wasm.py measured 28 MiB with a warm cache and 35 MiB while compiling
# (Cranelift's peak); bench/bench_wasm_tenants.py measured the same through the daemon.
# A constant rather than a measurement at start: the peak that matters is the
# compile, which a warm daemon no longer sees, and a cap must not change between
# restarts. 40 = the 35 MiB compile peak + 5 MiB for the store's own allocations.
WASM_RUNNER_OVERHEAD = 40 << 20
WASM_PAGE = 64 * 1024
RUNNER_MODULE = "supervisord_qnx.wasm.runner"


class Launcher:
    """Starts command workers (the base every kind shares)."""

    # ``argv`` only copies the command and ``spawn`` is ``spawn_blocking`` in a thread:
    # the supervisor may then build the request and spawn in that one thread (one hop
    # per start instead of three). A kind that prepares files or spawns otherwise: False.
    one_hop: ClassVar[bool] = True

    def __init__(self, backend: Backend, reaper: ChildReaper) -> None:
        self.backend = backend
        self.reaper = reaper

    def argv(self, target: LaunchTarget) -> list[str]:
        """The worker's command line. Blocking (a kind may prepare files): call in a thread."""
        spec = target.spec
        assert isinstance(spec, CommandWorker)
        return list(spec.command)

    async def spawn(self, target: LaunchTarget, request: SpawnRequest) -> int:
        """Start the process inside its partition; return its pid (the reaper owns it)."""
        # A thread of its own that never ends (spawnthreads.py: parent-death signals).
        return await spawnthreads.run(self.spawn_blocking, request)

    def spawn_blocking(self, request: SpawnRequest) -> int:
        """``spawn``'s work, in the calling (worker) thread."""
        _require_program(request)
        with self.reaper.spawning():
            return self.reaper.adopt(self.backend.spawn(request))

    async def exit_reason(self, target: LaunchTarget, status: int) -> ExitReason | None:
        """What the process itself reported about its end; ``None``: only the status knows."""
        return None

    async def reported_exit(self, target: LaunchTarget) -> ExitReason | None:
        """How a run that was not our child (adopted after a daemon's death) ended, as
        the process itself reported it; ``None``: it reports nothing (commands)."""
        return None

    def status_fields(self, target: LaunchTarget) -> dict[str, Any]:
        """Extra fields for this worker in ``status``."""
        return {}

    async def refresh(self, target: LaunchTarget) -> None:
        """Re-read live counters a running worker reports (for ``status``)."""
        return None

    # Whether ``refresh`` does anything: ``status`` skips the call per worker otherwise.
    reports_counters = False


class LaunchTarget:
    """What a launcher needs to know of one worker instance."""

    def __init__(
        self, tenant: str, partition: str, spec: WorkerBase, index: int, instances: int
    ) -> None:
        self.tenant = tenant
        self.partition = partition
        self.spec = spec
        self.index = index
        self.instances = instances  # in the whole tenant: they share its partition
        self.leaf = f"{spec.name}-{index}"
        # wasm runner counters, refreshed by WasmLauncher
        self.memory_denied = 0
        self.report_stamp = 0


class WasmLauncher(Launcher):
    """Starts WebAssembly workers through the wasm runner: from the pre-initialised fork
    server where the backend can attach a process that it did not spawn (docs/wasm.md, 7.),
    otherwise as a plain runner process."""

    one_hop: ClassVar[bool] = False  # argv writes the report's directory; spawn differs

    def __init__(
        self,
        backend: Backend,
        reaper: ChildReaper,
        tree: PartitionTree,
        state_dir: Path,
        forkserver: ForkServerKeeper,
        prefork: bool,
    ) -> None:
        super().__init__(backend, reaper)
        self.tree = tree
        self.state_dir = state_dir
        self.forkserver = forkserver
        self.prefork = prefork  # set by the daemon once it knows it is a subreaper

    def report_path(self, target: LaunchTarget) -> Path:
        return self.state_dir / "wasm" / f"{target.tenant}.{target.leaf}.report"

    def argv(self, target: LaunchTarget) -> list[str]:
        spec = target.spec
        assert isinstance(spec, WasmWorker)
        report = self.report_path(target)
        report.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            report.unlink()
        limits = spec.limits
        memory = limits.memory if limits.memory is not None else self.default_memory(target)
        args = RunnerArgs(
            module=str(spec.wasm),
            arg=tuple(spec.args),
            env=tuple(spec.env.items()),
            preopen=tuple((guest, str(host)) for guest, host in spec.preopen.items()),
            memory=memory,
            tables=limits.tables,
            instances=limits.instances,
            fuel=limits.fuel,
            timeout=limits.timeout,
            cache_dir=str(self.state_dir / "wasm-cache"),
            report=str(report),
        )
        argv = [sys.executable, "-m", RUNNER_MODULE, *args.to_argv()]
        return argv

    def default_memory(self, target: LaunchTarget) -> int | None:
        """The partition's max, shared among the tenant's instances, less what the runner
        process itself occupies, so the module meets a failed ``memory.grow`` before the
        OS partition has to kill the whole process."""
        cap = self.tree[target.partition].effective_memory_max
        if cap is None:
            return None
        share = cap // max(1, target.instances)
        # Whole wasm pages: memory.grow works in pages, so a partial page is never usable.
        return max(WASM_PAGE, (share - WASM_RUNNER_OVERHEAD) // WASM_PAGE * WASM_PAGE)

    async def spawn(self, target: LaunchTarget, request: SpawnRequest) -> int:
        # A runner that is not the daemon's user appends to a report made its own.
        report = self.report_path(target)
        await trio.to_thread.run_sync(
            functools.partial(confine.grant, report, request.process, create=True)
        )
        request = await trio.to_thread.run_sync(confine.per_user_cache, request)
        if request.process.container:
            # Namespaces come from unshare, an exec: the plain runner. Its report and
            # module cache stay writable inside.
            request = await trio.to_thread.run_sync(confine.container_writes, request, report)
            return await super().spawn(target, request)
        if self.prefork:
            pid = await self._spawn_preforked(request)
            if pid is not None:
                return pid
        return await super().spawn(target, request)

    async def _spawn_preforked(self, request: SpawnRequest) -> int | None:
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
        # Our own command line (built by argv() above): the runner's arguments follow it.
        runner_argv = argv[argv.index(RUNNER_MODULE) + 1 :]
        cwd = request.cwd or os.getcwd()

        def spawn_blocking() -> int:
            # The orphan sweep stays off for the whole request: the worker becomes the
            # daemon's child before the server answers, and may already have ended.
            with self.reaper.spawning():
                settings = {**plan.as_dict(), "process": request.process.as_dict()}
                pid = server.spawn(runner_argv, request.env, cwd, request.stdout, settings)
                self.reaper.register(pid)
                return pid

        try:
            return await trio.to_thread.run_sync(spawn_blocking)
        except ForkServerGone as exc:
            # Slower, never stopped: this start uses the plain runner; the next start
            # brings a new server up.
            log.warning("wasm fork server lost; plain runner for this start", error=str(exc))
            return None

    async def exit_reason(self, target: LaunchTarget, status: int) -> ExitReason | None:
        return await self.reported_exit(target)

    async def reported_exit(self, target: LaunchTarget) -> ExitReason | None:
        # The report's path is the instance's own, and an adopted runner kept writing
        # to it while no daemon ran: its last run's `exit` line says how it ended.
        from supervisord_qnx.wasm.outcome import read_report

        report = await trio.to_thread.run_sync(read_report, self.report_path(target))
        target.memory_denied = _denials(report)
        if report["exit"] and report["exit"].get("reason"):
            return ExitReason.parse(str(report["exit"]["reason"]))
        return None

    def status_fields(self, target: LaunchTarget) -> dict[str, Any]:
        return {"memory_denied": target.memory_denied}

    reports_counters = True

    async def refresh(self, target: LaunchTarget) -> None:
        from supervisord_qnx.wasm.outcome import read_report

        path = self.report_path(target)
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return
        # status is a hot path: re-read a report only when the runner wrote to it since
        # the last look (it coalesces denials to ~1 line a second), and then in a
        # thread: the event loop never reads a tenant's file.
        if stamp != target.report_stamp:
            target.report_stamp = stamp
            target.memory_denied = _denials(await trio.to_thread.run_sync(read_report, path))


class Launchers:
    """One launcher per worker kind, chosen by the worker's spec; owns what they share
    beyond a single start (the wasm fork server)."""

    def __init__(
        self, backend: Backend, reaper: ChildReaper, tree: PartitionTree, daemon: DaemonSpec
    ) -> None:
        self.forkserver = ForkServerKeeper(
            reaper, Path(daemon.log_dir) / "wasm-forkserver.log", backend
        )
        # Forks every worker's log writer (supervise/logserver.py).
        self.log_writers = WriterServer(reaper)
        self._wasm_prefork = daemon.wasm_prefork
        self.command = Launcher(backend, reaper)
        self.wasm = WasmLauncher(
            backend, reaper, tree, Path(daemon.state_dir), self.forkserver, prefork=False
        )

    def bind(self, nursery: trio.Nursery) -> None:
        """The supervisor's nursery, which owns the fork server's watcher task."""
        self.forkserver.nursery = nursery
        self.log_writers.nursery = nursery
        self.log_writers.prestart()

    def for_spec(self, spec: WorkerBase) -> Launcher:
        return self.wasm if isinstance(spec, WasmWorker) else self.command

    def enable_prefork(self, subreaper: bool) -> None:
        """Only a child subreaper gets the fork server's workers as its own children
        (docs/wasm.md, 7.), so pre-forked starts need the daemon to be one."""
        self.wasm.prefork = self._wasm_prefork and subreaper
        # The same holds for forked log writers.
        self.log_writers.enabled = subreaper

    @property
    def forkserver_pid(self) -> int | None:
        return self.forkserver.pid

    async def stop(self) -> None:
        await self.forkserver.stop()
        await self.log_writers.stop()

    def kill(self) -> None:
        self.forkserver.kill()
        self.log_writers.kill()


def _denials(report: dict[str, Any]) -> int:
    denied = report.get("memory_denied") or {}
    return int(denied.get("count") or 0)


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
