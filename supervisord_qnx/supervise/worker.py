"""The worker lifecycle: one object per worker instance that decides every move. Pure: no I/O.

Rules of this file (in the way h11's ``_state.py`` owns a connection):

* Everything that decides a transition lives here: the state, the operator's
  intent (should it run?), the exit bookkeeping and the restart tracker. The
  supervisor feeds a ``Lifecycle`` what happened (an operator call, a spawn
  result, an exit, a timer) and performs the ``Action``s it answers with; it
  never sets a state itself.
* Every move is one row of ``TRANSITIONS``: (state, event) -> (state, actions).
  A pair with no row cannot happen in a correct supervisor, so it raises
  ``IllegalTransition`` (the supervisor's failure boundary turns that into this
  worker's ``fatal``, never the daemon's exit).
* One state-triggered rule sits beside the table: a worker that reaches
  ``stopped`` while its intent is "run" (a ``start`` or ``restart`` arrived
  while it was stopping) starts again at once (``AUTO_START``).
* The table is data, so ``docs/lifecycle.md`` and the tests print it.
* Time comes in as an argument (``now``, monotonic seconds); timers are one
  ``deadline`` the performing task sleeps until, then reports ``timer``.

States::

    stopped   not running, and nobody asked it to (initial, or after stop)
    starting  spawn requested, process not yet confirmed alive
    running   process alive
    backoff   ended or failed to spawn; waiting for the restart delay
    stopping  stop requested: stop signal sent (or due once the spawn returns),
              SIGKILL after stop_timeout
    exited    ended and will not be restarted by policy (never / clean exit)
    fatal     restarted too often (intensity limit), could not be spawned at
              all, or an internal or backend failure gave up on it
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from supervisord_qnx.config.model import RestartSpec
from supervisord_qnx.exits import ExitKind, ExitReason
from supervisord_qnx.supervise.policy import RestartTracker, Verdict


class State(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FATAL = "fatal"


class Event(enum.StrEnum):
    START = "start"  # operator or autostart: run it (with a fresh restart history)
    STOP = "stop"  # operator: stop it
    RESTART = "restart"  # operator: stop the current run, then run again
    SPAWNED = "spawned"  # the process exists
    SPAWN_RETRY = "spawn-retry"  # spawn failed for a passing reason; policy says try again
    SPAWN_FATAL = "spawn-fatal"  # spawn failed for good, or the intensity limit is reached
    EXIT_RESTART = "exit-restart"  # the process ended; policy says restart after a delay
    EXIT_FINAL = "exit-final"  # the process ended; policy says leave it
    EXIT_FATAL = "exit-fatal"  # the process ended; intensity limit reached (or unrunnable)
    EXIT_STOPPED = "exit-stopped"  # the process ended while being stopped
    TIMER = "timer"  # the backoff delay or the stop timeout elapsed
    FAILURE = "failure"  # an internal or backend failure: give up on this instance


class Action(enum.StrEnum):
    SPAWN = "spawn"  # start a process in the worker's leaf; report spawned / spawn_failed
    SIGNAL = "signal"  # send stop_signal to the worker's process group
    KILL = "kill"  # SIGKILL the worker's process group
    CLEAR_LEAF = "clear-leaf"  # kill whatever the run left in its partition leaf
    RELEASE_LEAF = "release-leaf"  # the instance is stopped: drop its leaf


S, E, A = State, Event, Action

TRANSITIONS: dict[tuple[State, Event], tuple[State, tuple[Action, ...]]] = {
    # Settled states: an operator call moves them; a failure while releasing is fatal.
    (S.STOPPED, E.START): (S.STARTING, (A.SPAWN,)),
    (S.STOPPED, E.RESTART): (S.STARTING, (A.SPAWN,)),
    (S.STOPPED, E.STOP): (S.STOPPED, ()),
    (S.STOPPED, E.FAILURE): (S.FATAL, ()),
    (S.EXITED, E.START): (S.STARTING, (A.SPAWN,)),
    (S.EXITED, E.RESTART): (S.STARTING, (A.SPAWN,)),
    (S.EXITED, E.STOP): (S.STOPPED, (A.RELEASE_LEAF,)),
    (S.EXITED, E.FAILURE): (S.FATAL, ()),
    (S.FATAL, E.START): (S.STARTING, (A.SPAWN,)),
    (S.FATAL, E.RESTART): (S.STARTING, (A.SPAWN,)),
    # Stopping a fatal worker keeps the verdict visible; its leaf goes.
    (S.FATAL, E.STOP): (S.FATAL, (A.RELEASE_LEAF,)),
    (S.FATAL, E.FAILURE): (S.FATAL, ()),
    # A spawn is in flight: stop waits for its answer, then signals what it started.
    (S.STARTING, E.START): (S.STARTING, ()),
    (S.STARTING, E.RESTART): (S.STARTING, ()),
    (S.STARTING, E.STOP): (S.STOPPING, ()),
    (S.STARTING, E.SPAWNED): (S.RUNNING, ()),
    (S.STARTING, E.SPAWN_RETRY): (S.BACKOFF, (A.CLEAR_LEAF,)),
    (S.STARTING, E.SPAWN_FATAL): (S.FATAL, (A.CLEAR_LEAF,)),
    (S.STARTING, E.FAILURE): (S.FATAL, (A.CLEAR_LEAF,)),
    (S.RUNNING, E.START): (S.RUNNING, ()),
    (S.RUNNING, E.RESTART): (S.STOPPING, (A.SIGNAL,)),
    (S.RUNNING, E.STOP): (S.STOPPING, (A.SIGNAL,)),
    (S.RUNNING, E.EXIT_RESTART): (S.BACKOFF, (A.CLEAR_LEAF,)),
    (S.RUNNING, E.EXIT_FINAL): (S.EXITED, (A.CLEAR_LEAF,)),
    (S.RUNNING, E.EXIT_FATAL): (S.FATAL, (A.CLEAR_LEAF,)),
    (S.RUNNING, E.FAILURE): (S.FATAL, (A.KILL, A.CLEAR_LEAF)),
    # The operator's start does not wait out a crash loop's delay.
    (S.BACKOFF, E.START): (S.STARTING, (A.SPAWN,)),
    (S.BACKOFF, E.RESTART): (S.STARTING, (A.SPAWN,)),
    (S.BACKOFF, E.STOP): (S.STOPPED, (A.RELEASE_LEAF,)),
    (S.BACKOFF, E.TIMER): (S.STARTING, (A.SPAWN,)),
    (S.BACKOFF, E.FAILURE): (S.FATAL, ()),
    # Stopping: later operator calls only change the intent (AUTO_START reads it).
    (S.STOPPING, E.START): (S.STOPPING, ()),
    (S.STOPPING, E.RESTART): (S.STOPPING, ()),
    (S.STOPPING, E.STOP): (S.STOPPING, ()),
    (S.STOPPING, E.SPAWNED): (S.STOPPING, (A.SIGNAL,)),
    (S.STOPPING, E.SPAWN_RETRY): (S.STOPPED, (A.CLEAR_LEAF, A.RELEASE_LEAF)),
    (S.STOPPING, E.SPAWN_FATAL): (S.STOPPED, (A.CLEAR_LEAF, A.RELEASE_LEAF)),
    (S.STOPPING, E.EXIT_STOPPED): (S.STOPPED, (A.CLEAR_LEAF, A.RELEASE_LEAF)),
    (S.STOPPING, E.TIMER): (S.STOPPING, (A.KILL,)),
    (S.STOPPING, E.FAILURE): (S.FATAL, (A.KILL, A.CLEAR_LEAF)),
}

# The state-triggered rule beside the table: stopped with the intent "run" starts again.
AUTO_START = (S.STOPPED, E.START)

# States in which the worker has (or is about to have) a live process.
LIVE = frozenset({S.STARTING, S.RUNNING, S.STOPPING})
# States a `start --wait` settles on.
SETTLED_AFTER_START = frozenset({S.RUNNING, S.EXITED, S.FATAL, S.STOPPED})
# States a `stop --wait` settles on.
SETTLED_AFTER_STOP = frozenset({S.STOPPED, S.EXITED, S.FATAL})


class IllegalTransition(Exception):
    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"no transition from {state} on {event}")
        self.state = state
        self.event = event


def next_state(state: State, event: Event) -> State:
    return _row(state, event)[0]


def _row(state: State, event: Event) -> tuple[State, tuple[Action, ...]]:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


def transition_table() -> str:
    """The table as aligned text (printed in docs/lifecycle.md and by the tests)."""
    rows = [("state", "event", "next", "actions")] + [
        (s, e, n, " ".join(acts) or "-") for (s, e), (n, acts) in TRANSITIONS.items()
    ]
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


@dataclass
class Lifecycle:
    """One worker instance's state, intent and restart bookkeeping.

    Operator calls (``start``, ``stop``, ``restart``) and facts (``spawned``,
    ``spawn_failed``, ``exited``, ``timer``, ``fail``) each apply one event and
    queue its actions; ``next_action`` hands them out in order. Operator calls
    also bump ``intent_seq``, so that a caller waiting for the answer to its
    call can tell that a later call overruled it (the later intent wins).
    """

    policy: RestartSpec
    stop_timeout: float
    state: State = S.STOPPED
    want_running: bool = False
    intent_seq: int = 0
    pid: int | None = None
    started_at: float | None = None  # monotonic, of the current run
    exit_reason: ExitReason | None = None
    restarts: int = 0
    deadline: float | None = None  # backoff delay or stop timeout, monotonic
    backoff_delay: float = 0.0
    tracker: RestartTracker = field(init=False)
    _actions: deque[Action] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.tracker = RestartTracker(self.policy)

    # -- operator calls -------------------------------------------------------------

    def start(self, now: float) -> None:
        self._intent(True)
        if self.state in (S.STOPPED, S.EXITED, S.FATAL, S.BACKOFF):
            # An operator's start is a fresh try: the crash-loop history is theirs to clear.
            self.tracker.reset()
        self._apply(E.START, now)

    def stop(self, now: float) -> None:
        self._intent(False)
        self._apply(E.STOP, now)

    def restart(self, now: float) -> None:
        self._intent(True)
        if self.state in (S.STOPPED, S.EXITED, S.FATAL, S.BACKOFF):
            self.tracker.reset()
        self._apply(E.RESTART, now)

    # -- what happened --------------------------------------------------------------

    def spawned(self, pid: int, now: float) -> None:
        self.pid, self.started_at = pid, now
        self._apply(E.SPAWNED, now)

    def spawn_failed(self, why: str, now: float, *, transient: bool) -> None:
        self.exit_reason = ExitReason(ExitKind.SPAWN_FAILED, why)
        event = E.SPAWN_FATAL
        if transient and self.state is S.STARTING:
            decision = self.tracker.decide(self.exit_reason, now, 0.0)
            if decision.verdict is Verdict.RESTART:
                event, self.backoff_delay = E.SPAWN_RETRY, decision.delay
        self._apply(event, now)

    def exited(self, reason: ExitReason, now: float) -> None:
        """The current run's process ended with ``reason``."""
        uptime = now - self.started_at if self.started_at is not None else 0.0
        self.pid = None
        if self.state is S.STOPPING:
            self.exit_reason = reason.as_stopped()
            self._apply(E.EXIT_STOPPED, now)
            return
        self.exit_reason = reason
        if self.state is not S.RUNNING:
            raise IllegalTransition(self.state, E.EXIT_FINAL)
        decision = self.tracker.decide(reason, now, uptime)
        if decision.verdict is Verdict.RESTART and reason.permanent:
            self._apply(E.EXIT_FATAL, now)
        elif decision.verdict is Verdict.RESTART:
            self.backoff_delay = decision.delay
            self._apply(E.EXIT_RESTART, now)
        elif decision.verdict is Verdict.FINAL:
            self._apply(E.EXIT_FINAL, now)
        else:
            self._apply(E.EXIT_FATAL, now)

    def timer_due(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def timer(self, now: float) -> None:
        """The deadline passed: a backoff ends (a restart) or a stop escalates to SIGKILL."""
        if not self.timer_due(now):
            return
        self.deadline = None
        if self.state is S.BACKOFF:
            self.restarts += 1
        self._apply(E.TIMER, now)

    def fail(self, reason: ExitReason, now: float) -> None:
        """Give up on this instance (``internal: …`` or ``backend: …``); the daemon goes on."""
        self.exit_reason = reason
        self.pid = None
        self.want_running = False
        self._actions.clear()
        self._apply(E.FAILURE, now)

    # -- for the performing task ----------------------------------------------------

    def next_action(self) -> Action | None:
        return self._actions.popleft() if self._actions else None

    @property
    def has_actions(self) -> bool:
        return bool(self._actions)

    # -- internals --------------------------------------------------------------------

    def _intent(self, run: bool) -> None:
        self.want_running = run
        self.intent_seq += 1

    def _apply(self, event: Event, now: float) -> None:
        state, actions = _row(self.state, event)
        if state is S.STOPPED and self.want_running and event is not E.STOP:
            # AUTO_START: a start or restart arrived while this run was being stopped.
            self.tracker.reset()
            state, more = _row(state, AUTO_START[1])
            actions = actions + more
        self.state = state
        self._actions.extend(actions)
        if state is S.BACKOFF:
            self.deadline = now + self.backoff_delay
        elif A.SIGNAL in actions:
            self.deadline = now + self.stop_timeout
        elif state is not S.STOPPING:
            self.deadline = None
        if state not in LIVE:
            self.pid = None
        if state in (S.EXITED, S.FATAL):
            self.want_running = False
