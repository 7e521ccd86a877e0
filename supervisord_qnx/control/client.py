"""Clients of the control socket.

* :class:`Client` is blocking and uses only :mod:`socket`: the CLI runs it,
  and a command-line tool that imports trio pays for it on every keystroke.
  This module therefore imports trio only inside :class:`AsyncClient`'s
  methods; keep it that way (a test checks).
* :class:`AsyncClient` is for trio code (integration tests, benchmarks): many
  calls in flight on one connection, matched by msgid, and notifications
  delivered on a memory channel.

Both follow live events the same way: ``subscribe(topics=..., tenants=...)``, then
iterate ``stream()`` for the event records. The iteration ends with
:class:`SubscriptionOverflow` when the daemon dropped the subscriber for falling
behind, and with :class:`ConnectionLost` when the daemon went away.

Failures to reach the daemon raise :class:`DaemonUnreachable` subclasses,
which are also the matching built-in ``OSError`` subclasses
(``FileNotFoundError``, ``ConnectionRefusedError``, ...), with a message that
says what to do. Error responses raise :class:`~supervisord_qnx.control.rpc.RpcError`.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from supervisord_qnx.control.rpc import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MSGID_MAX,
    ConnectionClosed,
    InvalidMessage,
    MessageKind,
    Notification,
    ProtocolError,
    Response,
    RpcConnection,
    RpcError,
    encode_request,
)

if TYPE_CHECKING:
    import contextlib

    import trio

__all__ = [
    "AsyncClient",
    "CallTimeout",
    "Client",
    "ConnectionLost",
    "ControlAccessDenied",
    "ControlSocketMissing",
    "DaemonNotRunning",
    "DaemonUnreachable",
    "SubscriptionOverflow",
]

_READ_CHUNK = 64 * 1024


class DaemonUnreachable(OSError):
    """Cannot talk to the daemon; ``str()`` says why and what to do about it."""


class ControlSocketMissing(DaemonUnreachable, FileNotFoundError):
    pass


class DaemonNotRunning(DaemonUnreachable, ConnectionRefusedError):
    pass


class ControlAccessDenied(DaemonUnreachable, PermissionError):
    pass


class ConnectionLost(DaemonUnreachable, ConnectionResetError):
    pass


class CallTimeout(DaemonUnreachable, TimeoutError):
    pass


class SubscriptionOverflow(Exception):
    """The daemon dropped this subscriber because it fell ``dropped`` events behind."""

    def __init__(self, dropped: int, *, where: str = "the daemon") -> None:
        super().__init__(
            f"{where} dropped this event subscription: it fell {dropped} events behind "
            f"(read faster, subscribe to fewer kinds or tenants, or raise [daemon] "
            f"subscriber_queue)"
        )
        self.dropped = dropped


def _subscribe_params(topics: list[str] | None, tenants: list[str] | None) -> dict[str, list[str]]:
    params = {}
    if topics:
        params["topics"] = list(topics)
    if tenants:
        params["tenants"] = list(tenants)
    return params


def _event_record(note: Notification) -> dict[str, Any] | None:
    """The event record a notification carries; raises on ``overflow``; ``None`` for
    notifications this client does not know (a newer daemon may send more kinds)."""
    if note.method == "event":
        return note.params
    if note.method == "overflow":
        raise SubscriptionOverflow(int(note.params.get("dropped", 0)))
    return None


def _stream_ended() -> ConnectionLost:
    return ConnectionLost(
        "the daemon closed the event stream (it stopped or crashed; check its log)"
    )


def _connect_error(path: str, exc: OSError) -> DaemonUnreachable:
    """Turn a connect() failure into an error that tells the operator what to do."""
    if isinstance(exc, FileNotFoundError):
        return ControlSocketMissing(
            f"no daemon is listening on {path}: the socket does not exist "
            f"(is supervisord-qnx running? start it with `make run`)"
        )
    if isinstance(exc, ConnectionRefusedError):
        return DaemonNotRunning(
            f"no daemon is listening on {path}: the socket was left by a daemon that is no "
            f"longer running (start it with `make run`; it replaces the stale socket)"
        )
    if isinstance(exc, PermissionError):
        return ControlAccessDenied(
            f"permission denied on {path}: the control socket is open only to the user "
            f"running the daemon (run this command as that user)"
        )
    return DaemonUnreachable(f"cannot connect to the daemon on {path}: {exc}")


def _lost(method: str) -> ConnectionLost:
    return ConnectionLost(
        f"the daemon closed the connection before answering {method!r} "
        f"(it may be at its limit of control connections, or have stopped or crashed; "
        f"check its log)"
    )


def table_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``status``'s table form (``status(table=True)``, docs/protocol.md) as
    maps: one key per column (None for a field the row has not), and the ``sched`` cell
    replaced by the form it indexes."""
    columns, scheds = table["columns"], table["sched"]
    rows = [dict(zip(columns, values, strict=True)) for values in table["rows"]]
    if "sched" in columns:
        for row in rows:
            at = row["sched"]
            row["sched"] = None if at is None else scheds[at]
    return rows


class _MsgIds:
    """uint32 msgids, wrapping around and skipping ids still waiting for an answer."""

    def __init__(self) -> None:
        self._last = 0

    def next(self, in_use: dict[int, Any] | None = None) -> int:
        while True:
            self._last = self._last + 1 if self._last < MSGID_MAX else 1
            if in_use is None or self._last not in in_use:
                return self._last


class Client:
    """Blocking client: one call at a time on one connection, opened on first use.

    ``timeout`` (seconds, ``None`` for none) bounds connecting and each call.
    After a timeout or a broken connection the socket is closed and the next
    call reconnects. Notifications that arrive meanwhile are ignored.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        timeout: float | None = 10.0,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._sock: socket.socket | None = None
        self._rpc = RpcConnection(max_message_bytes)
        self._ids = _MsgIds()

    def connect(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise _connect_error(self.path, exc) from exc
        self._sock = sock
        self._rpc = RpcConnection(self.max_message_bytes)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def call(self, method: str, /, **params: Any) -> Any:
        """Call ``method`` with named ``params``; return its result or raise ``RpcError``."""
        self.connect()
        assert self._sock is not None
        msgid = self._ids.next()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            self._sock.sendall(encode_request(msgid, method, params))
            return self._wait_for(msgid, method, deadline)
        except TimeoutError as exc:
            # A late answer would be misread by the next call: start afresh.
            self.close()
            raise CallTimeout(
                f"no answer to {method!r} from the daemon on {self.path} within "
                f"{self.timeout:g} s (it may be busy or stuck; retry with a longer timeout)"
            ) from exc
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.close()
            raise _lost(method) from exc
        except (ProtocolError, ConnectionLost):
            self.close()
            raise

    def _wait_for(self, msgid: int, method: str, deadline: float | None) -> Any:
        assert self._sock is not None
        while True:
            for event in self._rpc.events():
                if isinstance(event, Response) and event.msgid == msgid:
                    if event.error is not None:
                        raise event.error
                    return event.result
                if isinstance(event, InvalidMessage) and event.msgid == msgid:
                    raise event.error
                if isinstance(event, ConnectionClosed):
                    raise _lost(method)
                # Anything else (notifications, stray responses) is not ours.
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self._sock.settimeout(remaining)
            self._rpc.receive_data(self._sock.recv(_READ_CHUNK))

    def subscribe(
        self, topics: list[str] | None = None, tenants: list[str] | None = None
    ) -> dict[str, Any]:
        """Turn this connection into an event stream (read it with :meth:`stream`).

        Make other calls on another client: this one, blocking, would drop the events
        that arrive while it waits for an answer."""
        result: dict[str, Any] = self.call("subscribe", **_subscribe_params(topics, tenants))
        return result

    def stream(self) -> Iterator[dict[str, Any]]:
        """Event records as they arrive, waiting as long as it takes (no timeout).

        Raises :class:`SubscriptionOverflow` if the daemon dropped this subscriber and
        :class:`ConnectionLost` when the connection ends."""
        sock = self._sock
        if sock is None:
            raise _stream_ended()
        sock.settimeout(None)
        while True:
            for event in self._rpc.events():
                if isinstance(event, ConnectionClosed):
                    self.close()
                    raise _stream_ended()
                if isinstance(event, Notification):
                    try:
                        record = _event_record(event)
                    except SubscriptionOverflow:
                        self.close()
                        raise
                    if record is not None:
                        yield record
            try:
                data = sock.recv(_READ_CHUNK)
            except OSError as exc:
                self.close()
                raise _stream_ended() from exc
            self._rpc.receive_data(data)


@dataclass
class _Pending:
    done: trio.Event
    result: Any = None
    error: BaseException | None = None


@dataclass
class _AsyncState:
    pending: dict[int, _Pending] = field(default_factory=dict)
    failure: BaseException | None = None


class AsyncClient:
    """trio client: ``async with AsyncClient(path) as c: await c.call("ping")``.

    Calls may run concurrently from several tasks; answers are matched by
    msgid. Notifications from the daemon arrive on ``c.notifications`` (a
    ``trio.MemoryReceiveChannel`` of :class:`~supervisord_qnx.control.rpc.Notification`,
    closed when the connection ends); if nobody reads them, those beyond
    ``notification_buffer`` are dropped and counted in ``dropped_notifications``
    rather than stalling the answers behind them.
    """

    # Set in __aenter__; trio is imported lazily, so they are only annotated here.
    notifications: trio.MemoryReceiveChannel[Notification]
    _stream: trio.SocketStream
    _send_lock: trio.Lock
    _notify_in: trio.MemorySendChannel[Notification]
    _exit_stack: contextlib.AsyncExitStack
    _cancel_scope: trio.CancelScope

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        notification_buffer: int = 1024,
    ) -> None:
        self.path = os.fspath(path)
        self.max_message_bytes = max_message_bytes
        self.notification_buffer = notification_buffer
        self.dropped_notifications = 0
        self._ids = _MsgIds()
        self._state = _AsyncState()

    async def __aenter__(self) -> AsyncClient:
        import contextlib

        import trio

        try:
            self._stream = await trio.open_unix_socket(self.path)
        except OSError as exc:
            raise _connect_error(self.path, exc) from exc
        self._send_lock = trio.Lock()
        self._notify_in, self.notifications = trio.open_memory_channel[Notification](
            self.notification_buffer
        )
        self._exit_stack = contextlib.AsyncExitStack()
        await self._exit_stack.enter_async_context(self._stream)
        nursery = await self._exit_stack.enter_async_context(trio.open_nursery())
        self._cancel_scope = nursery.cancel_scope
        nursery.start_soon(self._reader)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._cancel_scope.cancel()
        await self._exit_stack.__aexit__(exc_type, exc, tb)

    async def call(self, method: str, /, **params: Any) -> Any:
        """Call ``method``; cancel it with an enclosing trio cancel scope (e.g. ``fail_after``)."""
        import trio

        state = self._state
        if state.failure is not None:
            raise _lost(method) from state.failure
        msgid = self._ids.next(state.pending)
        pending = _Pending(trio.Event())
        state.pending[msgid] = pending
        try:
            async with self._send_lock:
                try:
                    await self._stream.send_all(encode_request(msgid, method, params))
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise _lost(method) from exc
            await pending.done.wait()
        finally:
            # A call cancelled while waiting just forgets its msgid; a late
            # answer is then ignored by the reader.
            state.pending.pop(msgid, None)
        if pending.error is not None:
            if isinstance(pending.error, ConnectionLost):
                raise _lost(method) from pending.error
            raise pending.error
        return pending.result

    async def subscribe(
        self, topics: list[str] | None = None, tenants: list[str] | None = None
    ) -> dict[str, Any]:
        """Turn this connection into an event stream (read it with :meth:`stream`); the
        connection still takes calls."""
        result: dict[str, Any] = await self.call("subscribe", **_subscribe_params(topics, tenants))
        return result

    async def stream(self) -> AsyncIterator[dict[str, Any]]:
        """Event records as they arrive (``async for record in client.stream()``).

        Raises :class:`SubscriptionOverflow` if the daemon dropped this subscriber, or if
        this client's own ``notification_buffer`` overflowed because the records were not
        taken from here fast enough; :class:`ConnectionLost` when the connection ends."""
        seen = self.dropped_notifications
        async for note in self.notifications:
            if self.dropped_notifications != seen:
                raise SubscriptionOverflow(self.dropped_notifications - seen, where="this client")
            record = _event_record(note)
            if record is not None:
                yield record
        raise _stream_ended()

    async def _reader(self) -> None:
        import trio

        rpc = RpcConnection(self.max_message_bytes)
        state = self._state
        failure: BaseException = ConnectionLost("the daemon closed the connection")
        try:
            while True:
                try:
                    data = await self._stream.receive_some(_READ_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                rpc.receive_data(data)
                for event in rpc.events():
                    if isinstance(event, ConnectionClosed):
                        return
                    self._handle(event)
        except ProtocolError as exc:
            if exc.kind is MessageKind.RESPONSE and exc.msgid is not None:
                self._resolve(exc.msgid, None, exc)
            failure = exc
        finally:
            state.failure = failure
            for pending in state.pending.values():
                if not pending.done.is_set():
                    pending.error = failure if isinstance(failure, RpcError) else ConnectionLost()
                    pending.done.set()
            self._notify_in.close()

    def _handle(self, event: object) -> None:
        """One decoded message: an answer to a call, or a notification."""
        import trio

        if isinstance(event, Response):
            self._resolve(event.msgid, event.result, event.error)
        elif isinstance(event, InvalidMessage) and event.msgid is not None:
            self._resolve(event.msgid, None, event.error)
        elif isinstance(event, Notification):
            try:
                self._notify_in.send_nowait(event)
            except trio.WouldBlock:
                self.dropped_notifications += 1

    def _resolve(self, msgid: int, result: Any, error: RpcError | None) -> None:
        pending = self._state.pending.get(msgid)
        if pending is None or pending.done.is_set():
            return  # cancelled call, or a msgid we never sent
        pending.result, pending.error = result, error
        pending.done.set()
