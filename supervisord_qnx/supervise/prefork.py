"""The wasm fork server's lifecycle, as the supervisor sees it (docs/wasm.md, 7.).

One ``ForkServerKeeper`` per supervisor owns at most one live fork server: it
starts one lazily on the first wasm start, through the child reaper so its exit
is collected like any worker's; notices when it died (a task waits on it) and
starts a new one on the next use; and ends it at shutdown. Starting a worker
through it is the supervisor's business; this module only keeps the server.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import structlog
import trio

from supervisord_qnx.partition.backend import Backend, BackendError, SpawnRequest
from supervisord_qnx.supervise import spawnthreads
from supervisord_qnx.supervise.reaper import ChildReaper, describe_status
from supervisord_qnx.wasm.forkserver import ForkServerClient, ForkServerGone

log = structlog.get_logger("supervisord_qnx.prefork")


#: The fork server's own partition: a leaf of the daemon's root partition (its own
#: cgroup on the cgroup backends), so it is counted, limited and killed with the rest.
FORKSERVER_LEAF = "wasm-forkserver"


class ForkServerKeeper:
    def __init__(self, reaper: ChildReaper, log_path: Path, backend: Backend | None = None) -> None:
        self.reaper = reaper
        self.log_path = log_path
        self.backend = backend
        self.nursery: trio.Nursery | None = None  # set by the supervisor's run()
        self._server: ForkServerClient | None = None
        self._exits: dict[int, trio.Event] = {}  # server pid -> reaped
        self._lock = trio.Lock()

    @property
    def pid(self) -> int | None:
        server = self._server
        return server.pid if server is not None and server.alive else None

    async def ready(self) -> ForkServerClient | None:
        """The live server, started if need be; ``None`` if it cannot start."""
        async with self._lock:
            server = self._server
            if server is not None and server.alive:
                return server
            if server is not None:
                log.warning("wasm fork server is gone; starting a new one", pid=server.pid)
                # The old process may still be alive (a lost connection, a hang): end
                # it; its watcher task reaps it.
                self._kill_pid(server.pid)
            server = ForkServerClient(self.log_path)
            # The portable accounting's owner value (its set_owner), for every forked worker.
            server.owner = getattr(self.backend, "owner", None)
            server.attach_procs = await self._own_partition()

            def spawn_child(popen: Callable[[], int]) -> int:
                with self.reaper.spawning():
                    pid = popen()
                    self.reaper.register(pid)
                    return pid

            try:
                # Its workers become the daemon's children, of the thread that started
                # the server: one that never ends (spawnthreads.py).
                pid = await spawnthreads.run(server.start, spawn_child)
            except (OSError, ForkServerGone) as exc:
                log.warning("wasm fork server did not start; plain runner", error=str(exc))
                if server.pid is not None:
                    self._watch(server)
                    self._kill_pid(server.pid)
                return None
            log.info("wasm fork server started", pid=pid)
            self._server = server
            self._watch(server)
            return server

    async def _own_partition(self) -> tuple[str, ...]:
        """The ``cgroup.procs`` files the server writes itself into before it runs (the
        attach shim, as workers do); none where the backend attaches otherwise."""
        if self.backend is None:
            return ()
        request = SpawnRequest("", FORKSERVER_LEAF, (), None, {}, -1, -1)
        try:
            plan = await trio.to_thread.run_sync(self.backend.attach_plan, request)
        except (BackendError, KeyError) as exc:
            # The user-space backends keep no record of the root partition: there the
            # server stays where the daemon is.
            log.info("wasm fork server: no partition of its own", error=repr(exc))
            return ()
        return plan.procs if plan is not None else ()

    async def _release_partition(self) -> None:
        if self.backend is not None:
            try:
                await trio.to_thread.run_sync(self.backend.release_leaf, "", FORKSERVER_LEAF)
            except (BackendError, KeyError) as exc:
                log.warning("wasm fork server: its partition stays", error=str(exc))

    def _kill_pid(self, pid: int | None) -> None:
        exited = self._exits.get(pid) if pid is not None else None
        if pid is not None and exited is not None and not exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _watch(self, server: ForkServerClient) -> None:
        assert self.nursery is not None and server.pid is not None
        pid = server.pid
        exited = self._exits[pid] = trio.Event()

        async def watch() -> None:
            status = await self.reaper.wait(pid)
            server.close()
            exited.set()
            level = log.info if server is not self._server else log.warning
            level("wasm fork server exited", pid=pid, status=str(describe_status(status)))

        self.nursery.start_soon(watch)

    async def stop(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - per-phase grace
        """At daemon shutdown: close its connection (it exits on end-of-file), then
        SIGTERM, then SIGKILL; wait until the reaper collected it."""
        server, self._server = self._server, None
        if server is None or server.pid is None:
            return
        exited = self._exits.get(server.pid)
        server.close()
        if exited is None:
            return
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.pid, sig)
            with trio.move_on_after(timeout):
                await exited.wait()
            if exited.is_set():
                break
        # Only now, with no server left that could live in it (one that died earlier
        # was replaced into the same leaf).
        await self._release_partition()

    def kill(self) -> None:
        """Last resort when the supervisor is torn down without ``stop``: the server must
        not outlive the daemon."""
        server, self._server = self._server, None
        if server is None or server.pid is None:
            return
        exited = self._exits.get(server.pid)
        if exited is None or exited.is_set():
            return
        server.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(server.pid, 0)
