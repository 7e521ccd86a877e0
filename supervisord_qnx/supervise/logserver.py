"""The log writer server, as the daemon sees it: one pre-started ``logwriter.py
--serve`` process that forks a log writer per worker instance on request, instead of
the daemon starting an interpreter for each (docs/logging.md, "Forked, not started").

Why: a started writer costs an interpreter start (15 to 25 ms of CPU here) and its own
heap (about 10 MiB RSS, 4.5 MiB PSS); a forked one costs two ``fork`` calls of a small
single-threaded process and shares the server's pages copy-on-write. Nothing else
changes: the writer is the same code, reads the same pipe, is the daemon's child (the
daemon is a child subreaper) in its own session, and outlives the daemon the same way.

One ``WriterServer`` per supervisor owns at most one live server: started on first use
(or ahead of it, ``prestart``) through the child reaper, watched by a task that notices
its death, replaced on the next use. A request that fails because the server died is
not retried on a new server: the caller starts that writer the old way (``logpipe``), so
a dead server costs one slow start, never a worker's start. The server ends at EOF when
the daemon closes its socket (shutdown) or dies; the writers it forked carry on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

import structlog
import trio

from supervisord_qnx.seqpacket import SeqpacketClient, ServerGone
from supervisord_qnx.supervise import logwriter, spawnthreads
from supervisord_qnx.supervise.reaper import ChildReaper, describe_status

log = structlog.get_logger("supervisord_qnx.logs")

READY_TIMEOUT_S = 30.0
REPLY_TIMEOUT_S = 30.0


class ServerClient(SeqpacketClient):
    """One server process and the daemon's end of its socket. Blocking: call in threads."""

    what = "log writer server"

    def __init__(self, reaper: ChildReaper) -> None:
        super().__init__()
        self.reaper = reaper

    def start(self) -> int:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self.reaper.spawning():
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-I",
                        "-S",
                        logwriter.__file__,
                        "--serve",
                        str(theirs.fileno()),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,  # the writers' stdout; stderr is the daemon's
                    pass_fds=(theirs.fileno(),),
                    close_fds=True,
                    # Its own session, as a started writer: a ^C to the daemon's group
                    # reaches neither the server nor the writers it forks.
                    start_new_session=True,
                    cwd="/",
                    env={},
                )
                self.pid = self.reaper.adopt(proc)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if self._handshake(ours, READY_TIMEOUT_S, 64) != logwriter.SERVER_READY:
            ours.close()
            raise ServerGone("log writer server did not say it was ready")
        self._connected(ours, REPLY_TIMEOUT_S)
        return self.pid

    def fork_writer(self, pipe_fd: int, dir_fd: int, name: str, max_size: int, keep: int) -> int:
        """Fork a writer reading ``pipe_fd`` into ``name`` in ``dir_fd``; its pid, which is
        the daemon's child from now on. Call inside ``reaper.spawning()`` and register the
        pid before leaving it (the writer may end at once). Raises ``ServerGone``."""
        request = f"{name}\0{max_size}\0{keep}".encode()
        reply = self._exchange(request, [pipe_fd, dir_fd], logwriter.MAX_REQUEST)
        if not reply.isdigit():
            raise OSError(reply.decode(errors="replace"))
        return int(reply)


class WriterServer:
    """Keeps ``SERVERS`` live log writer servers for the supervisor, used in turn (see the
    module docstring)."""

    # One server answers one request at a time, and a request is a chain of processes
    # (server, intermediate, writer; no intermediate with Linux's clone) that each wait
    # for a CPU: on a loaded 2-core machine (load 20) 100 writer starts queued for 1.4 s
    # behind one server.
    # Two chains overlap their waits; each server costs about 2 MiB PSS.
    SERVERS = 2

    def __init__(self, reaper: ChildReaper) -> None:
        self.reaper = reaper
        self.enabled = False  # only a child subreaper gets forked writers as its children
        self.nursery: trio.Nursery | None = None
        self._clients: list[ServerClient | None] = [None] * self.SERVERS
        self._turn = 0
        self._exits: dict[int, trio.Event] = {}
        self._locks = [trio.Lock() for _ in range(self.SERVERS)]

    @property
    def pids(self) -> list[int]:
        """The live servers' pids."""
        return [c.pid for c in self._clients if c is not None and c.alive and c.pid is not None]

    @property
    def pid(self) -> int | None:
        """The first server's pid (``None`` while it is not running)."""
        client = self._clients[0]
        return client.pid if client is not None and client.alive else None

    def prestart(self) -> None:
        """Start the servers in the background, so the first workers do not wait for them."""
        if self.enabled and self.nursery is not None:
            for slot in range(self.SERVERS):
                self.nursery.start_soon(self._ready, slot)

    async def ready(self) -> ServerClient | None:
        """A live server (the next in turn), started if need be; ``None``: start writers
        the old way."""
        slot = self._turn
        self._turn = (slot + 1) % self.SERVERS
        return await self._ready(slot)

    async def _ready(self, slot: int) -> ServerClient | None:
        if not self.enabled or self.nursery is None:
            return None
        async with self._locks[slot]:
            client = self._clients[slot]
            if client is not None and client.alive:
                return client
            if client is not None:
                log.warning("log writer server is gone; starting a new one", pid=client.pid)
                self._kill(client.pid)
            client = ServerClient(self.reaper)
            try:
                # Its writers are forked as the daemon's children, of the thread that
                # started the server: one that never ends (spawnthreads.py).
                pid = await spawnthreads.run(client.start)
            except (OSError, ServerGone) as exc:
                log.warning("log writer server did not start; writers start alone", error=str(exc))
                if client.pid is not None:
                    self._watch(client)
                    self._kill(client.pid)
                self._clients[slot] = None
                return None
            self._clients[slot] = client
            self._watch(client)
            log.debug("log writer server started", pid=pid)
            return client

    def _watch(self, client: ServerClient) -> None:
        assert self.nursery is not None and client.pid is not None
        pid = client.pid
        exited = self._exits[pid] = trio.Event()

        async def watch() -> None:
            status = await self.reaper.wait(pid)
            client.close()
            exited.set()
            self._exits.pop(pid, None)
            if client in self._clients:
                log.warning(
                    "log writer server exited", pid=pid, status=str(describe_status(status))
                )

        self.nursery.start_soon(watch)

    def _kill(self, pid: int | None) -> None:
        exited = self._exits.get(pid) if pid is not None else None
        if pid is not None and exited is not None and not exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def stop(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a grace period
        """At shutdown: close their sockets (they exit at EOF), SIGKILL after ``timeout``."""
        clients = [c for c in self._clients if c is not None and c.pid is not None]
        self._clients = [None] * self.SERVERS
        for client in clients:
            client.close()
        for client in clients:
            assert client.pid is not None
            exited = self._exits.get(client.pid)
            if exited is None:
                continue
            with trio.move_on_after(timeout):
                await exited.wait()
            if not exited.is_set():
                self._kill(client.pid)
                with trio.move_on_after(timeout):
                    await exited.wait()

    def kill(self) -> None:
        """When the supervisor is torn down without ``stop``: close the sockets, so the
        servers end at EOF. Not waited for: they hold nothing a worker needs."""
        clients, self._clients = self._clients, [None] * self.SERVERS
        for client in clients:
            if client is not None:
                client.close()
