"""The control socket: a trio Unix-socket server speaking msgpack-RPC.

:func:`serve` owns the socket file and the connections; what a method does is
the business of the ``dispatch`` callable it is given (normally a
:class:`MethodTable` filled by the daemon). Design points:

* **One task per connection, one task per request.** A slow request
  (``start`` with ``wait: true``) must not hold up ``status`` on the same
  connection, so responses can leave in a different order than the requests
  came; the msgid pairs them. At most ``max_in_flight`` requests run per
  connection; beyond that the server stops reading from it (backpressure
  through the kernel's socket buffer, not an unbounded queue here).
* **Streams.** A handler may answer with :class:`Streaming` (``subscribe``): its
  reply is written first, then its ``run`` goes on in the same task and pushes
  notifications through :meth:`Connection.send_notification`, interleaved with the
  responses to whatever else the client sends. It gives back its in-flight slot, and
  it is stopped when the client closes its side.
* **Misuse stays local.** A peer that sends garbage, oversized frames or
  half a frame, or disconnects while its requests run, affects only its own
  connection. A handler that raises something other than :class:`RpcError`
  is logged and answered with ``internal``; the server keeps going.
* **The socket file is ours alone.** A live daemon on the path is never
  displaced (:class:`AlreadyRunning`); a stale socket is replaced; a file
  that is not a socket is never touched. The socket is created under a
  restrictive umask so it is not world-accessible even between ``bind`` and
  ``chmod``, and it is removed on exit only if it is still the inode we bound.

Wire format and error codes: ``rpc.py`` and docs/protocol.md.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from supervisord_qnx.control import peercred
from supervisord_qnx.control.guard import (
    BYTES_PER_ELEMENT,
    DecodeBudget,
    Holding,
    PerUid,
    ServerLimits,
)
from supervisord_qnx.control.peercred import PeerCredentials
from supervisord_qnx.control.rpc import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ConnectionClosed,
    ErrorCode,
    InvalidMessage,
    MessageKind,
    Notification,
    ProtocolError,
    Request,
    Response,
    RpcConnection,
    RpcError,
    encode_error,
    encode_notification,
    encode_response,
)

__all__ = [
    "AlreadyRunning",
    "Connection",
    "Dispatch",
    "Handler",
    "MethodTable",
    "PeerCredentials",
    "ServeError",
    "Streaming",
    "serve",
]

log = structlog.get_logger(__name__)

DEFAULT_MAX_IN_FLIGHT: Final = 64
DEFAULT_PARTIAL_FRAME_TIMEOUT: Final = 30.0
_READ_CHUNK: Final = 64 * 1024
_LISTEN_BACKLOG: Final = 128
# accept() failures that mean "out of a resource right now", not "broken":
# wait a little and accept again rather than take the daemon down.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
# The peer went away between connect and accept: just take the next one.
_ACCEPT_SKIP_ERRNOS: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


class ServeError(Exception):
    """The control socket cannot be set up; ``str()`` tells the operator what to do."""


class AlreadyRunning(ServeError):
    """Another daemon answers on the control socket path."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"another supervisord-qnx is already serving on {path}; stop it first "
            f"(supervisorctl-qnx shutdown) or give this one another control socket path"
        )
        self.path = path


class Connection:
    """One client connection, as handlers see it.

    ``peer`` is who connected, read at accept (``peercred.py``: SO_PEERCRED on
    Linux, getpeereid() on QNX), or ``None`` where the platform does not say.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        conn_id: int,
        peer: PeerCredentials | None,
        write_timeout: float,
    ) -> None:
        self.id = conn_id
        self.peer = peer
        self.stream = stream
        self._write_timeout = write_timeout
        # Handlers run concurrently and each writes its own response; without
        # the lock two send_all calls could interleave their bytes.
        self._send_lock = trio.Lock()
        self._closed = False
        # stop() of each stream running on this connection (see Streaming).
        self._streams: set[Callable[[], None]] = set()
        self._hung_up = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def send_notification(self, method: str, params: Mapping[str, Any] | None = None) -> bool:
        """Push ``[2, method, [params]]`` to the client.

        Returns ``False`` if the client is gone, so that an event subscription
        can drop it; never raises for a vanished peer.
        """
        return await self.send_raw(encode_notification(method, params))

    async def send_raw(self, data: bytes) -> bool:
        if self._closed:
            return False
        if not self._send_lock.locked():
            # Fast path: most replies fit the socket buffer at once. A direct
            # non-blocking send spares the two scheduler round trips of trio's
            # send (a checkpoint before and after the syscall), about a quarter
            # of a small call's cost; what does not fit goes the usual way below.
            try:
                # fileno() each time: -1 (EBADF) once the socket is closed, never a
                # descriptor number the process has since reused.
                n = os.write(self.stream.socket.fileno(), data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._closed = True
                return False
            if n == len(data):
                return True
            data = data[n:]
        async with self._send_lock:
            if self._closed:
                return False
            with trio.move_on_after(self._write_timeout):
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # The client disconnected; its responses are dropped silently.
                    self._closed = True
                    return False
                return True
            # A client that stopped reading its responses: disconnect it
            # rather than let its handlers pile up behind the lock.
            log.warning("client is not reading its responses; disconnecting", conn=self.id)
            await self.close()
            return False

    async def close(self) -> None:
        self._closed = True
        await trio.aclose_forcefully(self.stream)

    def stop_streams(self) -> None:
        """The client closed its side: end every stream (a subscriber that hung up must
        not hold its task and its connection slot until the next event fails to send)."""
        self._hung_up = True
        for stop in list(self._streams):
            stop()

    def _add_stream(self, stop: Callable[[], None]) -> None:
        self._streams.add(stop)
        if self._hung_up:  # it hung up while the stream's reply was being written
            stop()


@dataclass(frozen=True, slots=True)
class Streaming:
    """A handler's answer that turns its request into a stream of notifications.

    ``result`` is sent as the response first; then ``run()`` is awaited in the request's
    own task, so its writes (with :meth:`Connection.send_notification`, each bounded by
    the write timeout) can never hold up another connection. ``stop()`` must make
    ``run`` return soon without cutting a message in half; the server calls it when the
    client closes its side, and if the response could not be sent.
    """

    result: Any
    run: Callable[[], Awaitable[None]]
    stop: Callable[[], None]


Dispatch = Callable[[str, dict[str, Any], Connection], Awaitable[Any]]
Handler = Callable[[dict[str, Any], Connection], Awaitable[Any]]


class MethodTable:
    """A ``dispatch`` callable built from named handlers.

    ``handler(params, conn)`` returns the result or raises :class:`RpcError`.
    Unknown names are answered with ``unknown_method`` listing the known ones::

        methods = MethodTable()

        @methods.method("ping")
        async def ping(params, conn):
            return "pong"

        await serve(path, methods)
    """

    def __init__(self, handlers: Mapping[str, Handler] | None = None) -> None:
        self._handlers: dict[str, Handler] = {}
        for name, handler in (handlers or {}).items():
            self.add(name, handler)

    def add(self, name: str, handler: Handler) -> None:
        if name in self._handlers:
            raise ValueError(f"method {name!r} is already registered")
        self._handlers[name] = handler

    def method(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`add`."""

        def register(handler: Handler) -> Handler:
            self.add(name, handler)
            return handler

        return register

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    async def __call__(self, method: str, params: dict[str, Any], conn: Connection) -> Any:
        handler = self._handlers.get(method)
        if handler is None:
            raise RpcError(
                ErrorCode.UNKNOWN_METHOD,
                f"unknown method {method!r}; this daemon has: {', '.join(self.names())}",
            )
        return await handler(params, conn)


# ---------------------------------------------------------------------------
# Socket file


def _probe_existing(path: Path) -> None:
    """Make ``path`` free to bind: refuse a live daemon or a non-socket, remove a stale socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeError(
            f"{path} exists and is not a socket, so it was not left by supervisord-qnx and "
            f"is not touched; move it away or configure another control socket path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A Unix-socket connect completes as soon as the listener's backlog takes
    # it (no accept needed), so this only waits if the backlog is full.
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except ConnectionRefusedError:
        # Nobody listens: a daemon died without cleaning up. Safe to replace.
        os.unlink(path)
        log.info("removed stale control socket", path=str(path))
    except FileNotFoundError:
        pass  # removed between lstat and connect
    except (TimeoutError, BlockingIOError) as exc:
        raise AlreadyRunning(path) from exc  # alive, just busy
    except PermissionError as exc:
        raise ServeError(
            f"{path} belongs to someone else (permission denied when probing it); "
            f"another user's daemon may be running there: use another control socket path"
        ) from exc
    else:
        raise AlreadyRunning(path)
    finally:
        probe.close()


def _bind(path: Path, mode: int, group: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind() creates the file with 0777 & ~umask. umask is process-wide,
        # so it is held only across this one system call (no await in
        # between); a plain chmod afterwards would leave a window in which
        # any local user could connect.
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old_umask)
        if group is not None:
            # Before the chmod: the group may connect from the moment its bits are set.
            os.chown(path, -1, group)
        os.chmod(path, mode)
        sock.listen(_LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            # Lost a race with another daemon starting on the same path.
            raise AlreadyRunning(path) from exc
        if len(os.fsencode(path)) > 100:
            raise ServeError(
                f"cannot bind the control socket {path}: {exc.strerror}; Unix socket paths are "
                f"limited to about 100 bytes, use a shorter path"
            ) from exc
        raise ServeError(f"cannot bind the control socket {path}: {exc}") from exc
    return sock


def _remove_if_ours(path: Path, identity: tuple[int, int]) -> None:
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove the control socket", path=str(path), error=str(exc))


# ---------------------------------------------------------------------------
# Serving


class _Shedder:
    """Turns away connections when the daemon cannot (or must not) take more.

    Over ``max_connections`` a new connection is accepted and closed at once: its
    client hears "connection closed" instead of waiting in the backlog, and idle
    clients never take the descriptors spawns and backends need. If ``accept`` fails
    with ``EMFILE`` anyway (descriptors used elsewhere), one descriptor kept in reserve
    is freed for the moment it takes to accept and close the connections waiting in
    the backlog, so they drain instead of the loop waking up on them again and again;
    then the loop sleeps a little. Each burst is logged once, when it starts and ends.
    """

    def __init__(self, raw: socket.socket) -> None:
        self._raw = raw
        raw.setblocking(False)  # trio wants it so too; an accept here must never block
        self._reserve: int | None = None
        self.open_connections = 0
        self.shed = 0
        self.starved = False
        self._reserve_fd()

    def _reserve_fd(self) -> None:
        if self._reserve is None:
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._reserve = None

    def out_of_descriptors(self, exc: OSError) -> None:
        if not self.starved:
            self.starved = True
            log.error(
                "out of descriptors: new control connections are closed until some are "
                "released (raise RLIMIT_NOFILE or close idle clients)",
                error=str(exc),
                open_connections=self.open_connections,
            )
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        # Drain the backlog: each client waiting there hears "closed" now rather than
        # after its own timeout. One descriptor is enough, reused for each.
        for _ in range(_LISTEN_BACKLOG):
            try:
                sock, _ = self._raw.accept()
            except OSError:
                break
            sock.close()
            self.shed += 1
        self._reserve_fd()

    def over_limit(self, limit: int | None) -> bool:
        if limit is None or self.open_connections < limit:
            if self.starved:
                self.starved = False
                log.warning("accepting control connections again", shed=self.shed)
                self.shed = 0
            return False
        if not self.starved:
            self.starved = True
            log.error(
                "too many control connections: new ones are closed until some end",
                limit=limit,
            )
        self.shed += 1
        return True

    def close(self) -> None:
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None


async def serve(
    path: Path | str,
    dispatch: Dispatch,
    *,
    mode: int = 0o600,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    partial_frame_timeout: float = DEFAULT_PARTIAL_FRAME_TIMEOUT,
    max_connections: int | None = None,
    group: int | None = None,
    max_connections_per_uid: int | None = None,
    idle_timeout: float = math.inf,
    max_elements: int | None = None,
    max_depth: int | None = None,
    decode_budget: int | None = None,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at ``path`` until cancelled.

    Raises :class:`AlreadyRunning` or :class:`ServeError` before listening if
    the path cannot be taken; ``task_status.started(path)`` is called once
    clients can connect. ``partial_frame_timeout`` is the deadline for the whole of
    one message from its first byte, and also bounds how long a response may wait
    for a client that does not read. Beyond ``max_connections`` open connections
    (``None``: no limit but the descriptor limit), or ``max_connections_per_uid``
    from one uid, a new connection is closed as soon as it is accepted. ``group``
    owns the socket file. The other limits: ``guard.py``.
    """
    path = Path(path)
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be at least 1")
    RpcConnection(max_message_bytes)  # validates the limit here, not in every connection task
    limits = ServerLimits(
        max_message_bytes=max_message_bytes,
        max_in_flight=max_in_flight,
        frame_timeout=partial_frame_timeout,
        idle_timeout=idle_timeout,
        max_connections=max_connections,
        max_connections_per_uid=max_connections_per_uid,
        max_elements=max_elements,
        max_depth=max_depth,
        decode_budget=decode_budget,
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ServeError(f"cannot create the directory for the control socket: {exc}") from exc
    _probe_existing(path)
    listener = _bind(path, mode, group)
    st = os.lstat(path)
    identity = (st.st_dev, st.st_ino)
    shedder = _Shedder(listener)
    try:
        trio_listener = trio.socket.from_stdlib_socket(listener)
        log.info("control socket listening", path=str(path), mode=oct(mode))
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            accounts = _Accounts(DecodeBudget(decode_budget), PerUid(max_connections_per_uid))
            await _accept_loop(trio_listener, dispatch, limits, nursery, shedder, accounts)
    finally:
        shedder.close()
        listener.close()
        _remove_if_ours(path, identity)


@dataclass(frozen=True, slots=True)
class _Accounts:
    """What connections share: the decode budget and the count per uid."""

    budget: DecodeBudget
    per_uid: PerUid


async def _accept_loop(
    listener: trio.socket.SocketType,
    dispatch: Dispatch,
    limits: ServerLimits,
    nursery: trio.Nursery,
    shedder: _Shedder,
    accounts: _Accounts,
) -> None:
    ids = count(1)
    while True:
        try:
            sock, _ = await listener.accept()
        except OSError as exc:
            if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                # Not a spin: shed one waiting client, then wait before trying again.
                shedder.out_of_descriptors(exc)
                await trio.sleep(0.1)
                continue
            if exc.errno in _ACCEPT_SKIP_ERRNOS:
                continue
            raise
        if shedder.over_limit(limits.max_connections):
            sock.close()
            continue
        peer = peercred.read(sock)
        uid = peer.uid if peer else None
        if not accounts.per_uid.admit(uid):
            sock.close()
            continue
        conn = Connection(
            trio.SocketStream(sock),
            conn_id=next(ids),
            peer=peer,
            write_timeout=limits.frame_timeout,
        )
        shedder.open_connections += 1
        nursery.start_soon(_serve_counted, conn, dispatch, limits, shedder, accounts)


async def _serve_counted(
    conn: Connection,
    dispatch: Dispatch,
    limits: ServerLimits,
    shedder: _Shedder,
    accounts: _Accounts,
) -> None:
    holding = Holding(accounts.budget)
    try:
        await _serve_connection(conn, dispatch, limits, holding)
    finally:
        holding.release()
        shedder.open_connections -= 1
        accounts.per_uid.closed(conn.peer.uid if conn.peer else None)


async def _serve_connection(
    conn: Connection, dispatch: Dispatch, limits: ServerLimits, holding: Holding
) -> None:
    peer = conn.peer
    clog = log.bind(conn=conn.id, peer_pid=peer.pid if peer else None)
    clog.debug("control connection opened", peer_uid=peer.uid if peer else None)
    try:
        async with trio.open_nursery() as requests:
            await _read_loop(conn, dispatch, limits, requests, clog, holding)
            # Fall through: the nursery lets running requests finish, so a
            # client that half-closes after sending still gets its answers;
            # but streams would run on forever, so they end here.
            conn.stop_streams()
    finally:
        await conn.close()
        clog.debug("control connection closed")


async def _read_loop(
    conn: Connection,
    dispatch: Dispatch,
    limits: ServerLimits,
    requests: trio.Nursery,
    clog: Any,
    holding: Holding,
) -> None:
    rpc = RpcConnection(
        limits.max_message_bytes, max_elements=limits.max_elements, max_depth=limits.max_depth
    )
    in_flight = trio.Semaphore(limits.max_in_flight)
    stream = conn.stream
    buffered = 0  # bytes of an incomplete message, as charged to ``holding``
    frame_deadline = math.inf
    while True:
        # Silence between messages is fine for a while (a subscriber waits for
        # notifications; a client thinks); a message must arrive whole by its deadline,
        # counted from its first byte, however the peer trickles it (slowloris).
        deadline = frame_deadline if rpc.mid_frame else trio.current_time() + limits.idle_timeout
        data: bytes | None = None
        with trio.move_on_at(deadline):
            try:
                data = await stream.receive_some(_READ_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        if data is None:
            if _give_up_waiting(rpc, conn, in_flight, limits, clog):
                return
            continue
        started = not rpc.mid_frame  # this read begins a message
        rpc.receive_data(data)
        if not holding.change(rpc.buffered_bytes - buffered):
            clog.warning(
                "closing connection: the requests of all connections hold the whole decode budget",
                decode_budget=limits.decode_budget,
            )
            return
        buffered = rpc.buffered_bytes
        try:
            events = await _take_events(conn, rpc, dispatch, in_flight, limits, requests,
                                        clog, holding)  # fmt: skip
        finally:
            holding.change(rpc.buffered_bytes - buffered)
            buffered = rpc.buffered_bytes
        if events is None:
            return
        if (started or events) and rpc.mid_frame:
            frame_deadline = trio.current_time() + limits.frame_timeout


async def _take_events(
    conn: Connection,
    rpc: RpcConnection,
    dispatch: Dispatch,
    in_flight: trio.Semaphore,
    limits: ServerLimits,
    requests: trio.Nursery,
    clog: Any,
    holding: Holding,
) -> int | None:
    """Act on every message now complete; how many there were, or ``None`` when the
    connection is to be closed."""
    n = 0
    spawned = False
    try:
        for event in rpc.events():
            n += 1
            if isinstance(event, Request):
                # Backpressure: with max_in_flight requests running, wait
                # here, which stops reading this connection.
                if spawned:
                    # Requests that came in one read start in their order: through the
                    # scheduler once between two, the one spawned before runs first
                    # (trio runs the tasks of one batch in any order).
                    await in_flight.acquire()
                else:
                    try:
                        # A read's first request takes a free slot without a trip
                        # through the scheduler (Semaphore.acquire makes one even
                        # then): a tenth of a call's cost.
                        in_flight.acquire_nowait()
                    except trio.WouldBlock:
                        await in_flight.acquire()
                cost = rpc.last_bytes + rpc.last_elements * BYTES_PER_ELEMENT
                if not holding.change(cost):
                    in_flight.release()
                    await _over_budget(conn, event, limits, clog)
                    continue
                requests.start_soon(
                    _run_request, conn, dispatch, event, in_flight, limits, clog,
                    lambda cost=cost: holding.change(-cost),
                )  # fmt: skip
                spawned = True
            elif isinstance(event, ConnectionClosed):
                if event.partial:
                    clog.info("client closed the connection in the middle of a message")
                return None
            else:
                await _answer_other(conn, event, clog)
    except ProtocolError as exc:
        clog.info("protocol error, closing connection", code=str(exc.code), error=exc.message)
        if exc.kind is MessageKind.REQUEST and exc.msgid is not None:
            await conn.send_raw(encode_error(exc.msgid, RpcError(exc.code, exc.message)))
        return None
    return n


def _give_up_waiting(
    rpc: RpcConnection,
    conn: Connection,
    in_flight: trio.Semaphore,
    limits: ServerLimits,
    clog: Any,
) -> bool:
    """A read timed out: whether to close the connection (a message not whole by its
    deadline, or an idle connection) or wait on (its answers or its events are due)."""
    if rpc.mid_frame:
        clog.info(
            "closing connection: a message did not arrive whole in time",
            frame_timeout=limits.frame_timeout,
        )
        return True
    if in_flight.value < limits.max_in_flight or conn._streams:  # noqa: SLF001
        return False  # waiting for its answers or its events is not idleness
    clog.info("closing idle connection", idle_timeout=limits.idle_timeout)
    return True


async def _over_budget(conn: Connection, request: Request, limits: ServerLimits, clog: Any) -> None:
    clog.warning(
        "request refused: the requests of all connections hold the whole decode budget",
        method=request.method,
        decode_budget=limits.decode_budget,
    )
    error = RpcError(
        ErrorCode.OVERLOADED,
        f"{request.method} was not run: the daemon holds as many requests from all "
        f"connections as its decode budget ({limits.decode_budget} bytes) allows; "
        f"retry later",
    )
    await conn.send_raw(encode_error(request.msgid, error))


async def _answer_other(conn: Connection, event: object, clog: Any) -> None:
    """A message that is not a request: a malformed one is answered where it has a msgid;
    notifications and responses are ignored (the server sends no requests and takes no
    notifications yet; ignoring keeps the door open for both directions)."""
    if isinstance(event, InvalidMessage):
        clog.info("invalid message", kind=event.kind.name, error=event.error.message)
        if event.kind is MessageKind.REQUEST and event.msgid is not None:
            await conn.send_raw(encode_error(event.msgid, event.error))
    elif isinstance(event, Notification | Response):
        clog.debug("ignoring unexpected message", type=type(event).__name__)


def _single_rpc_error(exc: BaseException) -> RpcError | None:
    """The RpcError a handler meant to raise, even if a nursery wrapped it in a group."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, RpcError) else None


async def _run_request(
    conn: Connection,
    dispatch: Dispatch,
    request: Request,
    in_flight: trio.Semaphore,
    limits: ServerLimits,
    clog: Any,
    release_budget: Callable[[], object] = lambda: None,
) -> None:
    msgid, method = request.msgid, request.method
    stream: Streaming | None = None
    released = False
    try:
        try:
            result = await dispatch(method, request.params, conn)
            if isinstance(result, Streaming):
                stream, result = result, result.result
        except Exception as exc:  # noqa: BLE001 - a handler's bug is that request's error
            error = _single_rpc_error(exc)
            if error is None:
                clog.exception("control method failed", method=method)
                error = RpcError(
                    ErrorCode.INTERNAL,
                    str(exc) or type(exc).__name__,
                    exception=type(exc).__name__,
                )
            data = encode_error(msgid, error)
        else:
            try:
                data = encode_response(msgid, result)
            except (TypeError, ValueError, OverflowError) as exc:
                clog.error(
                    "control method returned an unencodable value", method=method, error=str(exc)
                )
                data = encode_error(
                    msgid,
                    RpcError(
                        ErrorCode.INTERNAL, f"{method} returned a value that cannot be sent: {exc}"
                    ),
                )
            if len(data) > limits.max_message_bytes:
                data = encode_error(
                    msgid,
                    RpcError(
                        ErrorCode.TOO_LARGE,
                        f"the result of {method} is {len(data)} bytes, over the "
                        f"{limits.max_message_bytes}-byte message limit; ask for less (e.g. "
                        f"fewer log lines, one tenant, one partition, status as a table)",
                    ),
                )
        sent = await conn.send_raw(data)
        if stream is not None and sent and not conn.closed:
            # A stream is not work in flight: its slot goes back to the requests.
            in_flight.release()
            release_budget()
            released = True
            conn._add_stream(stream.stop)  # noqa: SLF001 - the server's own registry
            try:
                await stream.run()
            except Exception:  # noqa: BLE001 - a stream's bug ends that connection, not the daemon
                clog.exception("stream failed; closing the connection", method=method)
                await conn.close()
            finally:
                conn._streams.discard(stream.stop)  # noqa: SLF001
    finally:
        if stream is not None:
            stream.stop()
        if not released:
            in_flight.release()
            release_budget()
