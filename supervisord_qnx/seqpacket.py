"""The daemon's end of a helper server it forks and talks to over a SOCK_SEQPACKET
socketpair: the log writer server (supervise/logserver.py) and the wasm fork server
(wasm/forkserver.py). One message is one request or one reply, file descriptors ride
along with a request, and replies are matched to requests by order, so one request is
in flight at a time. Blocking: call from threads."""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence


class ServerGone(Exception):
    """The server is not running or broke its connection."""


class SeqpacketClient:
    """What both helper servers' clients share: the socket, its lock, the handshake and
    one request/reply exchange. ``gone`` is the exception type a subclass raises when
    the server is not there (its callers catch their own name for it)."""

    what = "server"
    gone: type[Exception] = ServerGone

    def __init__(self) -> None:
        self.pid: int | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._sock is not None

    def _handshake(self, ours: socket.socket, ready_timeout: float, max_size: int) -> bytes:
        """The server's first message (its ready word), read within ``ready_timeout``;
        an empty message means it exited first. On failure ``ours`` is closed."""
        ours.settimeout(ready_timeout)
        try:
            msg = ours.recv(max_size)
        except OSError as exc:
            ours.close()
            raise self.gone(f"{self.what} did not become ready: {exc}") from None
        if not msg:
            ours.close()
            raise self.gone(f"{self.what} exited before it was ready")
        return msg

    def _connected(self, ours: socket.socket, reply_timeout: float) -> None:
        ours.settimeout(reply_timeout)
        self._sock = ours

    def _exchange(self, request: bytes, fds: Sequence[int], max_size: int) -> bytes:
        """Send one request with ``fds`` and return its reply. A broken connection is
        dropped (the next use starts a new server) and raised as ``gone``."""
        with self._lock:  # one request at a time: replies are matched by order
            sock = self._sock
            if sock is None:
                raise self.gone(f"{self.what} not running")
            try:
                socket.send_fds(sock, [request], list(fds))
                reply = sock.recv(max_size)
            except OSError as exc:
                self._drop()
                raise self.gone(f"{self.what} connection lost: {exc}") from None
            if not reply:
                self._drop()
                raise self.gone(f"{self.what} closed its connection")
        return reply

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Close the connection: the server exits when it reads end-of-file."""
        with self._lock:
            self._drop()
