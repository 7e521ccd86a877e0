"""Live events: ``subscribe`` turns a control connection into a stream of notifications.

The daemon's events all pass through :class:`~supervisord_qnx.supervise.events.EventBus`.
A subscriber gets its own bounded queue on that bus and its own task here, the one that
writes ``[2, "event", [record]]`` to its socket. The rules that keep a subscriber from
ever costing anyone else anything:

* The bus only calls ``send_nowait``: it never waits for a subscriber and never holds
  more than ``[daemon] subscriber_queue`` records for one.
* Writes to the socket happen in the subscriber's own task, each bounded by the
  connection's write timeout; a subscriber that does not read blocks only itself.
* When its queue is full the subscriber is *overflowed*: it leaves the bus at once (the
  queued records are thrown away, not sent), gets one ``[2, "overflow", [{"dropped":
  N}]]`` after the message being written (if it reads within the write timeout), and
  its connection is closed. A client that wants every event reconnects and reads the
  ``events`` history for what it missed (records carry ``seq``).

Filtering happens before queueing, so events a subscriber did not ask for never fill its
queue. A subscribed connection stays a normal connection: any other request (``ping``,
``status``, ``unsubscribe``) is answered, its response interleaved with the
notifications at message boundaries.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import structlog
import trio

from supervisord_qnx.control.rpc import ErrorCode, RpcError, encode_notification
from supervisord_qnx.control.server import Connection, Streaming
from supervisord_qnx.supervise.events import EventBus, Subscription

log = structlog.get_logger("supervisord_qnx.control")

EVENT: str = "event"
OVERFLOW: str = "overflow"


def tenant_of(record: Mapping[str, Any], tenant_paths: Mapping[str, str]) -> str | None:
    """The tenant an event record belongs to, or ``None`` for daemon-wide events.

    A record names its tenant outright (``tenant``), or through a worker
    (``tenant:leaf``), or through a partition: the tenant whose partition is that one or
    an ancestor of it (``tenant_paths``: tenant name -> its partition path)."""
    tenant = record.get("tenant")
    if isinstance(tenant, str):
        return tenant
    worker = record.get("worker")
    if isinstance(worker, str) and ":" in worker:
        return worker.split(":", 1)[0]
    partition = record.get("partition")
    if isinstance(partition, str):
        for name, path in tenant_paths.items():
            if partition == path or partition.startswith(path + "/"):
                return name
    return None


class EventFilter:
    """Which records a subscriber (or an ``events`` call) wants: by kind and by tenant.

    ``tenant_paths`` is asked again when the configuration object changes, so a filter
    follows tenants added or moved by a reload."""

    def __init__(
        self,
        topics: Collection[str] | None,
        tenants: Collection[str] | None,
        tenant_paths: Callable[[], Mapping[str, str]],
    ) -> None:
        self.topics = frozenset(topics) if topics else None
        self.tenants = frozenset(tenants) if tenants else None
        self._tenant_paths = tenant_paths

    def __call__(self, record: Mapping[str, Any]) -> bool:
        if self.topics is not None and record.get("kind") not in self.topics:
            return False
        if self.tenants is not None:
            return tenant_of(record, self._tenant_paths()) in self.tenants
        return True


def names_param(params: Mapping[str, Any], name: str) -> list[str] | None:
    """An optional list-of-names parameter (``topics``, ``tenants``), checked."""
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RpcError(
            ErrorCode.BAD_REQUEST, f"parameter {name!r} must be a list of non-empty strings"
        )
    return list(value)


class Subscribers:
    """The subscriptions of the daemon's connections (one per connection at most)."""

    def __init__(self, bus: EventBus, capacity: Callable[[], int]) -> None:
        self._bus = bus
        self._capacity = capacity
        self._by_conn: dict[int, _Stream] = {}

    def subscribe(self, conn: Connection, wants: EventFilter) -> Streaming:
        if conn.id in self._by_conn:
            raise RpcError(
                ErrorCode.INVALID_STATE,
                "this connection is already subscribed; send unsubscribe first to change "
                "the filter",
            )
        sub = self._bus.subscribe(self._capacity(), wants)
        stream = _Stream(conn, sub, lambda: self._by_conn.pop(conn.id, None))
        self._by_conn[conn.id] = stream
        reply = {
            "subscribed": True,
            "queue": sub.capacity,
            "topics": sorted(wants.topics) if wants.topics else None,
            "tenants": sorted(wants.tenants) if wants.tenants else None,
        }
        return Streaming(reply, stream.run, sub.close)

    async def unsubscribe(self, conn: Connection) -> dict[str, Any]:
        stream = self._by_conn.get(conn.id)
        if stream is None:
            raise RpcError(ErrorCode.INVALID_STATE, "this connection is not subscribed")
        stream.sub.close()
        # The reply must come after the last notification, so wait for the writer to
        # finish the message it may be in the middle of.
        await stream.done.wait()
        return {"unsubscribed": True}


class _Stream:
    def __init__(self, conn: Connection, sub: Subscription, forget: Callable[[], object]) -> None:
        self.conn = conn
        self.sub = sub
        self._forget = forget
        self.done = trio.Event()

    async def run(self) -> None:
        conn, sub = self.conn, self.sub
        try:
            async for record in sub.receive:
                if sub.ended:
                    break  # overflowed or unsubscribed: what is still queued is not sent
                try:
                    data = encode_notification(EVENT, record)
                except (TypeError, ValueError, OverflowError) as exc:
                    log.error("event cannot be sent", kind=record.get("kind"), error=str(exc))
                    continue
                if not await conn.send_raw(data):
                    return  # gone, or not reading for the write timeout (then closed)
            if sub.overflowed:
                dropped = sub.dropped + sub.discard_queued()
                log.warning(
                    "event subscriber fell behind; dropping it",
                    conn=conn.id,
                    dropped=dropped,
                    queue=sub.capacity,
                )
                await conn.send_notification(OVERFLOW, {"dropped": dropped})
                await conn.close()
        finally:
            sub.close()
            self._forget()
            self.done.set()
