"""The daemon's one internal event path.

Every state change, exit reason, restart, fatal, memory pressure, OOM kill and limit
kill is a typed event (one class per kind, one set of fields each) that goes through
``EventBus.emit``: it is logged, kept in a bounded history (the ``events`` method),
and fanned out to subscribers over bounded queues (``subscribe``, taken up by the
live-events work). A slow subscriber loses events (and is told how many) rather than
ever blocking the daemon.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import structlog
import trio

log = structlog.get_logger("supervisord_qnx.events")


@dataclass(frozen=True)
class DaemonEvent:
    """One kind of event: its own class, its own fields (the wire shows them flat)."""

    kind: ClassVar[str]
    # Kinds an operator should notice in the log.
    warning: ClassVar[bool] = False

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class StateChanged(DaemonEvent):
    kind = "state"
    worker: str
    old: str
    new: str
    pid: int | None
    exit_reason: str | None


@dataclass(frozen=True)
class WorkerFatal(DaemonEvent):
    kind = "fatal"
    warning = True
    worker: str
    exit_reason: str | None
    restarts: int
    window: float


@dataclass(frozen=True)
class WorkerRestarting(DaemonEvent):
    kind = "restart"
    worker: str
    after: float  # the backoff delay it waited, in seconds


@dataclass(frozen=True)
class StartBlocked(DaemonEvent):
    """A tenant was not started: a tenant it is ``after`` was on its way up and did not
    come up (supervise/ordering.py). Its workers stay ``stopped``."""

    kind = "start-blocked"
    warning = True
    tenant: str
    after: str
    reason: str


@dataclass(frozen=True)
class PartitionRecreated(DaemonEvent):
    kind = "partition-recreated"
    warning = True
    partition: str
    worker: str
    cause: str


@dataclass(frozen=True)
class BackendWatchFailed(DaemonEvent):
    kind = "backend-watch-failed"
    warning = True
    error: str


@dataclass(frozen=True)
class PartitionCondition(DaemonEvent):
    """What a backend saw in a partition: ``memory-pressure``, ``memory-limit``,
    ``oom-kill`` (``partition.backend.EventKind``), with the backend's figures."""

    condition: str
    partition: str
    leaf: str | None
    detail: Mapping[str, object] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        extra = {k: v for k, v in self.detail.items() if k not in ("partition", "leaf")}
        return {"partition": self.partition, "leaf": self.leaf, **extra}


class Subscription:
    def __init__(self, bus: EventBus, capacity: int) -> None:
        self._bus = bus
        self.send, self.receive = trio.open_memory_channel[dict[str, Any]](capacity)
        self.dropped = 0

    def close(self) -> None:
        self._bus._subscribers.discard(self)  # noqa: SLF001 - its own bus's registry
        self.send.close()


# Backend conditions that mean a tenant was killed.
_WARNING_CONDITIONS = frozenset({"memory-limit", "oom-kill"})


class EventBus:
    def __init__(self, history: int = 1000) -> None:
        self.history: deque[dict[str, Any]] = deque(maxlen=history)
        self._subscribers: set[Subscription] = set()
        self._seq = 0

    def emit(self, event: DaemonEvent) -> dict[str, Any]:
        self._seq += 1
        kind = event.condition if isinstance(event, PartitionCondition) else event.kind
        data = event.fields()
        record = {"seq": self._seq, "time": time.time(), "kind": kind, **data}
        self.history.append(record)
        warn = event.warning or kind in _WARNING_CONDITIONS
        (log.warning if warn else log.info)(kind, **data)
        for sub in list(self._subscribers):
            try:
                sub.send.send_nowait(record)
            except trio.WouldBlock:
                sub.dropped += 1
            except trio.ClosedResourceError:
                self._subscribers.discard(sub)
        return record

    def subscribe(self, capacity: int = 256) -> Subscription:
        sub = Subscription(self, capacity)
        self._subscribers.add(sub)
        return sub
