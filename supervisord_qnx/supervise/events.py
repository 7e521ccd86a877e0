"""The daemon's one internal event path.

Every state change, exit reason, restart, fatal, memory pressure, OOM kill and limit
kill is a typed event (one class per kind, one set of fields each) that goes through
``EventBus.emit``: it is logged, kept in a bounded history (the ``events`` method),
and fanned out to subscribers over bounded queues (the ``subscribe`` method,
``control/subscribe.py``). A slow subscriber is dropped (and told how many events it
lost) rather than ever blocking the daemon.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Mapping
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


@dataclass(frozen=True)
class ProcessAttached(DaemonEvent):
    """An operator moved a process the daemon did not start into a partition."""

    kind = "attach"
    pid: int
    partition: str
    own: bool


@dataclass(frozen=True)
class ProcessDetached(DaemonEvent):
    """An attached process was put back where it came from."""

    kind = "detach"
    pid: int
    partition: str


@dataclass(frozen=True)
class JobStarted(DaemonEvent):
    """A transient job (``run``) is running in its own partition."""

    kind = "job-start"
    job: str
    partition: str
    pid: int
    job_kind: str  # command or wasm
    command: list[str]
    timeout: float | None


@dataclass(frozen=True)
class JobExited(DaemonEvent):
    """A transient job ended; its partition is removed by the time this is emitted."""

    kind = "job-exit"
    job: str
    partition: str
    pid: int | None
    exit_reason: str
    exit_code: int  # what `supervisorctl-qnx run` exits with


class Subscription:
    """One subscriber's bounded queue of event records.

    The bus only ever calls ``send_nowait`` on it: a subscriber whose queue is full is
    *overflowed* (``overflowed``, ``dropped`` counted) and taken off the bus at once,
    rather than ever making :meth:`EventBus.emit` wait or buffer more for it. Whoever
    drains ``receive`` (the control server's subscriber task) stops at ``ended`` and
    tells its client.
    """

    def __init__(
        self, bus: EventBus, capacity: int, wants: Callable[[dict[str, Any]], bool] | None
    ) -> None:
        self._bus = bus
        self.send, self.receive = trio.open_memory_channel[dict[str, Any]](capacity)
        self.capacity = capacity
        self.wants = wants
        self.dropped = 0
        self.overflowed = False
        self.ended = False

    def overflow(self) -> None:
        """The queue is full: count the event that did not fit and leave the bus."""
        self.dropped += 1
        self.overflowed = True
        self.close()

    def discard_queued(self) -> int:
        """Empty the queue without delivering it; how many records were in it."""
        n = 0
        while True:
            try:
                self.receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return n
            n += 1

    def close(self) -> None:
        """No more events: what is queued stays readable, then ``receive`` ends."""
        self.ended = True
        self._bus._subscribers.discard(self)  # noqa: SLF001 - its own bus's registry
        self.send.close()


# Backend conditions that mean a tenant was killed.
_WARNING_CONDITIONS = frozenset({"memory-limit", "oom-kill"})


class EventBus:
    def __init__(self, history: int = 1000) -> None:
        self.history: deque[dict[str, Any]] = deque(maxlen=history)
        self._subscribers: set[Subscription] = set()
        self._seq = 0
        # Called with every event, in the loop (the runtime state's writer: supervise/state.py).
        self.listeners: list[Callable[[DaemonEvent], None]] = []

    def emit(self, event: DaemonEvent) -> dict[str, Any]:
        self._seq += 1
        kind = event.condition if isinstance(event, PartitionCondition) else event.kind
        data = event.fields()
        record = {"seq": self._seq, "time": time.time(), "kind": kind, **data}
        self.history.append(record)
        warn = event.warning or kind in _WARNING_CONDITIONS
        (log.warning if warn else log.info)(kind, **data)
        for listener in self.listeners:
            listener(event)
        for sub in list(self._subscribers):
            if sub.wants is not None and not sub.wants(record):
                continue
            try:
                sub.send.send_nowait(record)
            except trio.WouldBlock:
                sub.overflow()
            except trio.ClosedResourceError:
                self._subscribers.discard(sub)
        return record

    def subscribe(
        self, capacity: int = 1024, wants: Callable[[dict[str, Any]], bool] | None = None
    ) -> Subscription:
        """A new subscriber's queue of ``capacity`` records, holding only those for which
        ``wants(record)`` is true (all of them without ``wants``)."""
        sub = Subscription(self, capacity, wants)
        self._subscribers.add(sub)
        return sub

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)


@dataclass(frozen=True)
class Reloaded(DaemonEvent):
    """A reload was applied (``ok``), or refused with every problem (nothing changed)."""

    kind = "reload"
    ok: bool
    added: list[str]
    removed: list[str]
    restarted: list[str]
    resized: list[str]
    unchanged: list[str]
    failed: list[dict[str, str]]  # {"partition", "reason"}: resizes the OS or admission refused
    overrides_dropped: list[str]
    problems: list[str]  # why a refused reload was refused

    @property
    def warning(self) -> bool:  # type: ignore[override]
        return not self.ok or bool(self.failed)


@dataclass(frozen=True)
class LimitsSet(DaemonEvent):
    """``set`` changed a live partition's figures (until the next reload)."""

    kind = "set"
    partition: str
    changes: dict[str, list[Any]]  # {"memory.max": [old, new], ...}
