"""Readiness and liveness from workers: the receiving end of the sd_notify protocol
(``sdnotify.py`` is the sending end, for the daemon's own manager).

A worker with ``ready = "notify"`` or a ``watchdog`` gets its own ``AF_UNIX`` datagram
socket, named to it in ``$NOTIFY_SOCKET``, so a program written for systemd's
``Type=notify`` works unchanged: ``READY=1`` makes a ``starting`` worker ``running``,
``WATCHDOG=1`` keeps its watchdog from firing, ``STATUS=...`` shows in ``status``.
Everything else systemd defines (``MAINPID=``, ``ERRNO=``, ``STOPPING=1``,
``RELOADING=1``, file-descriptor store...) is accepted and ignored.

Who sent it: the socket has ``SO_PASSCRED``, so the kernel stamps every datagram with
the sender's pid (``SCM_CREDENTIALS``; a sender cannot forge it). A message counts only
if that pid is in the worker's partition leaf (its process or one of their
descendants, as the backend sees them: cgroup membership, or the portable backend's
leaf tag). Which socket a message came to says whom it is *for*, never whom it is
*from*: another tenant, or anything else on the box that can reach the path, is
ignored (logged at debug level and counted in ``status`` as ``notify_ignored``).
A platform without ``SCM_CREDENTIALS`` (QNX) cannot tell, so there every message is
ignored and ``ready = "notify"`` ends in ``start-timeout``.

Where: a directory the daemon owns, mode 0700 (``state_dir/notify``; if that path is too
long for a socket address, a fresh ``mkdtemp`` directory in the system's temporary
directory), one socket per worker instance named by a number. The path stays the
same across the instance's restarts; datagrams still queued from an earlier run are
dropped before each start.

Never blocking the daemon: the sockets are non-blocking; a receiver reads at most
``BATCH`` datagrams per wake-up, each at most ``MAX_DATAGRAM`` bytes (longer ones are
ignored), before it yields to the event loop; the kernel's socket buffer bounds what a
flood can queue. Membership is checked without the backend for the worker's own pid,
and otherwise once per sender pid and run (the answer is cached, the cache bounded).
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

log = structlog.get_logger("supervisord_qnx.notify")

MAX_DATAGRAM = 4096
BATCH = 32
MAX_VERDICTS = 256
MAX_STATUS = 512  # characters of STATUS= kept for `status`
# The longest path a socket address holds, with room to spare (sun_path is 108 on Linux).
MAX_SOCKET_PATH = 100
_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_HAS_CREDS = hasattr(socket, "SO_PASSCRED") and hasattr(socket, "SCM_CREDENTIALS")
_ANCILLARY = socket.CMSG_SPACE(_CREDS.size) + socket.CMSG_SPACE(16 * 4)
# Descriptors a worker sends (SCM_RIGHTS) arrive close-on-exec: they are closed at once,
# but until then a worker spawned by another thread must not inherit one of them.
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


@dataclass(frozen=True)
class Notification:
    """One accepted message: what it said that the daemon acts on."""

    pid: int
    ready: bool = False
    watchdog: bool = False
    status: str | None = None


def parse(data: bytes, pid: int) -> Notification | None:
    """The assignments of one datagram (``KEY=VALUE`` lines); ``None`` if it is not text."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    ready = watchdog = False
    status = None
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "READY":
            ready = ready or value == "1"
        elif key == "WATCHDOG":
            watchdog = watchdog or value == "1"
        elif key == "STATUS":
            status = value[:MAX_STATUS]
    return Notification(pid, ready, watchdog, status)


class NotifyDir:
    """The directory of every worker's notify socket, created on first use."""

    def __init__(self, state_dir: Path) -> None:
        self.preferred = state_dir / "notify"
        self.path: Path | None = None
        self._temporary = False
        self._next = 0

    def _ensure(self) -> Path:
        if self.path is not None:
            return self.path
        path = self.preferred
        if len(os.fsencode(path / "99999.sock")) > MAX_SOCKET_PATH:
            # A deep state_dir: a socket address cannot hold it.
            path, self._temporary = Path(tempfile.mkdtemp(prefix="sqnx-notify-")), True
        else:
            path.mkdir(parents=True, exist_ok=True)
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                # A symlink planted there must not move the sockets, or the chmod below.
                raise OSError(errno.ENOTDIR, f"{path} is not a directory")
        # Only the daemon (and its workers, which run as its user) may reach the sockets.
        os.chmod(path, 0o700)
        self.path = path
        return path

    def endpoint(self) -> NotifyEndpoint:
        """A new socket for one worker instance, bound and listening for credentials."""
        directory = self._ensure()
        self._next += 1
        path = directory / f"{self._next}.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale one from an earlier daemon
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            if _HAS_CREDS:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.bind(str(path))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return NotifyEndpoint(str(path), sock)

    def close(self) -> None:
        if self.path is not None and self._temporary:
            shutil.rmtree(self.path, ignore_errors=True)
        self.path = None


class NotifyEndpoint:
    """One worker instance's socket, and what the daemon knows from it."""

    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        self.sock = sock
        self.status_text: str | None = None
        self.ignored = 0  # messages not from the worker's leaf (or unreadable)
        self._verdicts: dict[int, bool] = {}  # sender pid -> in the leaf, this run

    def reset(self) -> None:
        """A new run starts: drop what earlier runs queued and said."""
        self.status_text = None
        self._verdicts.clear()
        for _ in range(10_000):  # bounded: a sender could refill it as fast as we drain
            try:
                self.sock.recv(1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return

    def fields(self) -> dict[str, object]:
        return {"notify_socket": self.path, "notify_ignored": self.ignored}

    async def serve(
        self,
        member: Callable[[int], Awaitable[bool]],
        deliver: Callable[[Notification], None],
        worker: str,
    ) -> None:
        """Receive for as long as the daemon runs: each message from a pid that
        ``member`` accepts is parsed and handed to ``deliver``."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            for _ in range(BATCH):
                got = self._receive()
                if got is None:
                    break
                data, pid, whole = got
                note = parse(data, pid) if whole and pid > 0 else None
                if note is None:
                    self._ignore(worker, pid, "unreadable or oversized message")
                elif not await self._in_leaf(pid, member):
                    self._ignore(worker, pid, "sender is not in the worker's partition leaf")
                else:
                    if note.status is not None:
                        self.status_text = note.status
                    deliver(note)
            # Bounded work per wake-up: a flood waits its turn behind everything else.
            await trio.lowlevel.checkpoint()

    def _receive(self) -> tuple[bytes, int, bool] | None:
        """One datagram: (bytes, sender pid or -1, not truncated); ``None`` when empty."""
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(MAX_DATAGRAM, _ANCILLARY, _RECV_FLAGS)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            raise
        pid = -1
        for level, kind, payload in ancillary:
            if level != socket.SOL_SOCKET:
                continue
            if _HAS_CREDS and kind == socket.SCM_CREDENTIALS and len(payload) >= _CREDS.size:
                pid = _CREDS.unpack(payload[: _CREDS.size])[0]
            elif kind == socket.SCM_RIGHTS:
                # A file-descriptor store message: we keep none, so close what came.
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        whole = not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
        return data, pid, whole

    async def _in_leaf(self, pid: int, member: Callable[[int], Awaitable[bool]]) -> bool:
        if pid == os.getpid():
            return False  # the daemon itself is in no worker's leaf
        verdict = self._verdicts.get(pid)
        if verdict is None:
            verdict = await member(pid)
            if len(self._verdicts) >= MAX_VERDICTS:
                self._verdicts.clear()
            self._verdicts[pid] = verdict
        return verdict

    def _ignore(self, worker: str, pid: int, why: str) -> None:
        self.ignored += 1
        log.debug("notify message ignored", worker=worker, pid=pid, why=why)

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
