"""Restart policy: whether a worker that ended comes back, after how long, and when to
give up. Pure: the caller passes the clock in.

Mirrors Erlang/OTP supervisors: restarts are counted in a sliding ``window``;
one more than ``max_restarts`` within it and the worker is ``fatal`` (a crash
loop is reported, not hidden).

Backoff is for crash loops only. A run is *healthy* when it lasted at least
``backoff_max`` seconds, the longest delay the policy would ever make it wait:
then its end is news, not part of a loop, and the worker restarts at once (no
delay, as OTP and supervisord restart a child that was up). A run shorter than
that is part of a crash loop: the first one waits ``backoff_initial``, and each
further one in a row twice as long, up to ``backoff_max``. The intensity limit
counts every restart, immediate ones included: a worker that dies every few
seconds after healthy runs still ends ``fatal`` once it passes ``max_restarts``
within ``window``.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

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


def healthy(uptime: float, spec: RestartSpec) -> bool:
    """A run that lasted at least ``backoff_max`` seconds: its end restarts at once."""
    return uptime >= spec.backoff_max


@dataclass
class RestartTracker:
    spec: RestartSpec
    # Restart times inside the window, made at the first restart: an empty deque reserves
    # a 64-slot block, about 700 bytes per configured worker (issue 14: daemon RSS).
    _recent: deque[float] | None = None
    _streak: int = 0

    def decide(self, exit_reason: ExitReason, now: float, uptime: float) -> Decision:
        """Decide what happens to a worker that ended with ``exit_reason`` after ``uptime`` s."""
        policy = self.spec.policy
        if policy == "never" or (policy == "on-failure" and not exit_reason.failure):
            return Decision(Verdict.FINAL)
        if self._recent is None:
            self._recent = deque()
        while self._recent and now - self._recent[0] > self.spec.window:
            self._recent.popleft()
        if len(self._recent) >= self.spec.max_restarts:
            return Decision(Verdict.FATAL)
        self._recent.append(now)
        if healthy(uptime, self.spec):
            # Not a crash loop: restart at once, and a quick crash of the new run starts
            # its backoff over from backoff_initial.
            self._streak = 0
            return Decision(Verdict.RESTART, 0.0)
        delay = backoff_delay(self.spec.backoff_initial, self.spec.backoff_max, self._streak)
        # The streak only needs to reach the cap: counting on would grow without bound
        # in a loop that stays under the intensity limit for hours.
        self._streak = min(self._streak + 1, _MAX_DOUBLINGS)
        return Decision(Verdict.RESTART, delay)

    def reset(self) -> None:
        """An operator start clears the history: they asked for a fresh try."""
        self._recent = None
        self._streak = 0
