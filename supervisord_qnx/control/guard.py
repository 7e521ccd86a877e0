"""The control server's limits, and the shared accounts that enforce the ones that span
connections.

Each limit answers one way a client can cost the daemon or the other clients:

=======================  ==========================================================
limit                    what it stops
=======================  ==========================================================
``max_message_bytes``    one message buffering without end
``max_elements``         a small message decoding into a huge object (a million
                         empty arrays is 1 MB of msgpack and ~64 MB of lists)
``max_depth``            deep nesting that makes every later walk of the data slow
``decode_budget``        many connections each holding a message in flight, or
                         half a message: the sum, across all connections
``max_connections``      descriptors and tasks taken by idle clients
``max_connections_per_uid``  one local user taking every connection slot
``max_in_flight``        one connection running unboundedly many requests
``idle_timeout``         connections opened and forgotten
``frame_timeout``        slowloris: a message trickled in one byte at a time (the
                         deadline is for the whole message, not per read)
=======================  ==========================================================

A breach is answered with an error where the stream is still in sync, and otherwise
closes only that connection; nothing here ever waits, so it can never stall others.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Final

import structlog

from supervisord_qnx.control.rpc import DEFAULT_MAX_MESSAGE_BYTES

log = structlog.get_logger("supervisord_qnx.control")

# What one decoded element is taken to cost in memory (a list slot plus a small object),
# for the budget; a million empty lists measured about 64 bytes each.
BYTES_PER_ELEMENT: Final = 64
# Each connection may hold this much without drawing on the shared budget, so that a
# well-behaved client's small requests are never refused because others hold it all.
FREE_PER_CONNECTION: Final = 16 * 1024


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Every limit of the control server (docs/security.md lists them with defaults)."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_in_flight: int = 64
    frame_timeout: float = 30.0
    idle_timeout: float = math.inf
    max_connections: int | None = None
    max_connections_per_uid: int | None = None
    max_elements: int | None = None
    max_depth: int | None = None
    decode_budget: int | None = None


class DecodeBudget:
    """Bytes that requests may hold across all connections: partly received messages
    (their buffered bytes) and requests being run (their size plus their elements)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        """Charge ``n`` bytes; ``False`` (and nothing charged) if that is over the budget."""
        if self.limit is not None and n > 0 and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class Holding:
    """What one connection holds of the budget, above its free allowance."""

    def __init__(self, budget: DecodeBudget) -> None:
        self._budget = budget
        self._free = FREE_PER_CONNECTION
        self.charged = 0  # drawn from the shared budget
        self.held = 0  # everything this connection holds

    def change(self, delta: int) -> bool:
        """Hold ``delta`` bytes more (or fewer); ``False`` if the budget cannot cover it
        (then nothing changed)."""
        held = self.held + delta
        need = max(0, held - self._free) - self.charged
        if need > 0 and not self._budget.take(need):
            return False
        if need < 0:
            self._budget.give(-need)
        self.charged += need
        self.held = held
        return True

    def release(self) -> None:
        self._budget.give(self.charged)
        self.charged = self.held = 0


class PerUid:
    """Open connections per peer uid (``None``: credentials unknown, counted together)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.open: Counter[int | None] = Counter()
        self._refusing: set[int | None] = set()

    def admit(self, uid: int | None) -> bool:
        if self.limit is not None and self.open[uid] >= self.limit:
            if uid not in self._refusing:
                self._refusing.add(uid)
                log.warning(
                    "too many control connections from one user: new ones are closed "
                    "until some end",
                    peer_uid=uid,
                    limit=self.limit,
                )
            return False
        self._refusing.discard(uid)
        self.open[uid] += 1
        return True

    def closed(self, uid: int | None) -> None:
        self.open[uid] -= 1
        if self.open[uid] <= 0:
            del self.open[uid]
