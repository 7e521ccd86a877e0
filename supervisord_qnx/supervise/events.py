"""The daemon's one internal event path.

Every state change, exit reason, restart, fatal, memory pressure, OOM kill
and limit kill goes through ``EventBus.emit``: it is logged, kept in a bounded
history, and fanned out to subscribers (the future ``subscribe`` method) over
bounded queues. A slow subscriber loses events (and is told how many) rather
than ever blocking the daemon.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import structlog
import trio

log = structlog.get_logger("supervisord_qnx.events")


class Subscription:
    def __init__(self, bus: EventBus, capacity: int) -> None:
        self._bus = bus
        self.send, self.receive = trio.open_memory_channel[dict[str, Any]](capacity)
        self.dropped = 0

    def close(self) -> None:
        self._bus._subscribers.discard(self)
        self.send.close()


class EventBus:
    def __init__(self, history: int = 1000) -> None:
        self.history: deque[dict[str, Any]] = deque(maxlen=history)
        self._subscribers: set[Subscription] = set()
        self._seq = 0

    def emit(self, kind: str, **data: Any) -> dict[str, Any]:
        self._seq += 1
        event = {"seq": self._seq, "time": time.time(), "kind": kind, **data}
        self.history.append(event)
        level = "warning" if kind in ("fatal", "memory-limit", "oom-kill") else "info"
        getattr(log, level)(kind, **data)
        for sub in list(self._subscribers):
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                sub.dropped += 1
            except trio.ClosedResourceError:
                self._subscribers.discard(sub)
        return event

    def subscribe(self, capacity: int = 256) -> Subscription:
        sub = Subscription(self, capacity)
        self._subscribers.add(sub)
        return sub
