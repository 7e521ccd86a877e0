"""Restart policy: whether a worker that ended comes back, after how long, and when to
give up. Pure: the caller passes the clock in.

Mirrors Erlang/OTP supervisors: restarts are counted in a sliding ``window``;
one more than ``max_restarts`` within it and the worker is ``fatal`` (a crash
loop is reported, not hidden). Between restarts the delay doubles from
``backoff_initial`` up to ``backoff_max``, and starts over once the worker has
stayed up for longer than ``backoff_max`` (it was healthy; its next crash is
news, not part of the old loop).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from supervisord_qnx.config.model import RestartSpec
from supervisord_qnx.exits import ExitReason


class Verdict(enum.StrEnum):
    RESTART = "restart"
    FINAL = "final"  # leave it ended (policy never, or clean exit under on-failure)
    FATAL = "fatal"  # intensity limit reached


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    delay: float = 0.0


# 2**64 times any positive initial delay is past every sane backoff_max; a cap on the
# exponent keeps the arithmetic in range (float overflow at 2**1024 once stopped the daemon).
_MAX_DOUBLINGS = 64


def backoff_delay(initial: float, maximum: float, streak: int) -> float:
    """``initial`` doubled ``streak`` times, never above ``maximum``; bounded arithmetic."""
    return min(maximum, initial * float(2 ** min(streak, _MAX_DOUBLINGS)))


@dataclass
class RestartTracker:
    spec: RestartSpec
    _recent: deque[float] = field(default_factory=deque)
    _streak: int = 0

    def decide(self, exit_reason: ExitReason, now: float, uptime: float) -> Decision:
        """Decide what happens to a worker that ended with ``exit_reason`` after ``uptime`` s."""
        policy = self.spec.policy
        if policy == "never" or (policy == "on-failure" and not exit_reason.failure):
            return Decision(Verdict.FINAL)
        while self._recent and now - self._recent[0] > self.spec.window:
            self._recent.popleft()
        if len(self._recent) >= self.spec.max_restarts:
            return Decision(Verdict.FATAL)
        self._recent.append(now)
        if uptime > self.spec.backoff_max:
            self._streak = 0
        delay = backoff_delay(self.spec.backoff_initial, self.spec.backoff_max, self._streak)
        # The streak only needs to reach the cap: counting on would grow without bound
        # in a loop that stays under the intensity limit for hours.
        self._streak = min(self._streak + 1, _MAX_DOUBLINGS)
        return Decision(Verdict.RESTART, delay)

    def reset(self) -> None:
        """An operator start clears the history: they asked for a fresh try."""
        self._recent.clear()
        self._streak = 0
