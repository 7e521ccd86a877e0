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
    starting  spawn requested, process not yet confirmed alive; or, for a
              ``ready = "notify"`` worker, alive but not yet ready (no READY=1);
              ``start_timeout`` kills it then (exit reason ``start-timeout``)
    running   process alive (and ready); with a ``watchdog``, killed (exit
              reason ``watchdog``) when no WATCHDOG=1 came within that time
    backoff   ended or failed to spawn; waiting for the restart delay
    stopping  stop requested: stop signal sent (or due once the spawn returns),
              SIGKILL after stop_timeout
    exited    ended and will not be restarted by policy (never / clean exit)
    fatal     restarted too often (intensity limit), could not be spawned at
              all, or an internal or backend failure gave up on it
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from supervisord_qnx.config.model import RestartSpec, WorkerBase
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
    SPAWNED = "spawned"  # the process exists (and counts as ready: ready = "started")
    SPAWNED_UNREADY = "spawned-unready"  # the process exists; ready = "notify" waits for READY=1
    READY = "ready"  # the process said READY=1 (sd_notify)
    START_TIMEOUT = "start-timeout"  # no READY=1 within start_timeout
    WATCHDOG = "watchdog"  # no WATCHDOG=1 within the watchdog interval
    SPAWN_RETRY = "spawn-retry"  # spawn failed for a passing reason; policy says try again
    SPAWN_FATAL = "spawn-fatal"  # spawn failed for good, or the intensity limit is reached
    EXIT_RESTART = "exit-restart"  # the process ended; policy says restart after a delay
    EXIT_FINAL = "exit-final"  # the process ended; policy says leave it
    EXIT_FATAL = "exit-fatal"  # the process ended; intensity limit reached (or unrunnable)
    EXIT_STOPPED = "exit-stopped"  # the process ended while being stopped
    TIMER = "timer"  # the backoff delay or the stop timeout elapsed
    FAILURE = "failure"  # an internal or backend failure: give up on this instance
    ADOPTED = "adopted"  # a previous daemon's run found alive (supervise/adopt.py)
    RESUMED = "resumed"  # a previous daemon's backoff carried on (supervise/adopt.py)


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
    # At start-up only: what a previous daemon left (supervise/adopt.py).
    (S.STOPPED, E.ADOPTED): (S.RUNNING, ()),
    (S.STOPPED, E.RESUMED): (S.BACKOFF, ()),
    (S.EXITED, E.START): (S.STARTING, (A.SPAWN,)),
    (S.EXITED, E.RESTART): (S.STARTING, (A.SPAWN,)),
    (S.EXITED, E.STOP): (S.STOPPED, (A.RELEASE_LEAF,)),
    (S.EXITED, E.FAILURE): (S.FATAL, ()),
    (S.FATAL, E.START): (S.STARTING, (A.SPAWN,)),
    (S.FATAL, E.RESTART): (S.STARTING, (A.SPAWN,)),
    # Stopping a fatal worker keeps the verdict visible; its leaf goes.
    (S.FATAL, E.STOP): (S.FATAL, (A.RELEASE_LEAF,)),
    (S.FATAL, E.FAILURE): (S.FATAL, ()),
    # A spawn is in flight, or (ready = "notify") its process has not said READY=1 yet.
    (S.STARTING, E.START): (S.STARTING, ()),
    (S.STARTING, E.RESTART): (S.STARTING, ()),
    # The stop signal is queued at once: the task performs it after the spawn returns
    # (it performs one action at a time), or at once to a process waiting for READY=1.
    (S.STARTING, E.STOP): (S.STOPPING, (A.SIGNAL,)),
    (S.STARTING, E.SPAWNED): (S.RUNNING, ()),
    (S.STARTING, E.SPAWNED_UNREADY): (S.STARTING, ()),
    (S.STARTING, E.READY): (S.RUNNING, ()),
    (S.STARTING, E.START_TIMEOUT): (S.STARTING, (A.KILL,)),
    (S.STARTING, E.SPAWN_RETRY): (S.BACKOFF, (A.CLEAR_LEAF,)),
    (S.STARTING, E.SPAWN_FATAL): (S.FATAL, (A.CLEAR_LEAF,)),
    # A process that ends before it said READY=1 goes through the policy like any exit.
    (S.STARTING, E.EXIT_RESTART): (S.BACKOFF, (A.CLEAR_LEAF,)),
    (S.STARTING, E.EXIT_FINAL): (S.EXITED, (A.CLEAR_LEAF,)),
    (S.STARTING, E.EXIT_FATAL): (S.FATAL, (A.CLEAR_LEAF,)),
    (S.STARTING, E.FAILURE): (S.FATAL, (A.KILL, A.CLEAR_LEAF)),
    (S.RUNNING, E.START): (S.RUNNING, ()),
    (S.RUNNING, E.READY): (S.RUNNING, ()),
    (S.RUNNING, E.WATCHDOG): (S.RUNNING, (A.KILL,)),
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
    # The signal was queued by the stop itself (starting, stop).
    (S.STOPPING, E.SPAWNED): (S.STOPPING, ()),
    (S.STOPPING, E.SPAWNED_UNREADY): (S.STOPPING, ()),
    (S.STOPPING, E.READY): (S.STOPPING, ()),
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
    # Readiness and liveness (docs/configuration.md): with ``ready_notify`` a spawned
    # process stays ``starting`` until READY=1, for at most ``start_timeout`` seconds;
    # with ``watchdog`` a running one must send WATCHDOG=1 at least that often.
    ready_notify: bool = False
    start_timeout: float = 90.0
    watchdog: float | None = None
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
    # A list, not a deque: it holds a few actions at most, and an empty deque reserves a
    # 64-slot block (about 700 bytes per configured worker, issue 14: daemon RSS).
    _actions: list[Action] = field(default_factory=list)
    # The task took the SPAWN action and has not reported its outcome yet.
    _spawn_in_flight: bool = False
    # READY=1 that arrived while the spawn was still returning (the process was quicker).
    _ready_early: bool = False
    # Why the daemon killed the current run (start-timeout, watchdog): its exit's reason.
    _expired: ExitReason | None = None

    def __post_init__(self) -> None:
        self.tracker = RestartTracker(self.policy)

    @classmethod
    def for_worker(cls, policy: RestartSpec, spec: WorkerBase) -> Lifecycle:
        """The lifecycle of one instance of ``spec`` under its tenant's restart ``policy``."""
        return cls(
            policy,
            spec.stop_timeout,
            ready_notify=spec.ready == "notify",
            start_timeout=spec.start_timeout,
            watchdog=spec.watchdog,
        )

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

    # -- what a previous daemon left (start-up only) ---------------------------------

    def adopted(self, pid: int, started_at: float, now: float) -> None:
        """A run a previous daemon started is still alive: it is this one's now (its
        uptime counts from ``started_at``, monotonic, the same clock across daemons)."""
        self._intent(True)
        self.pid, self.started_at = pid, started_at
        self._apply(E.ADOPTED, now)

    def resumed(self, delay: float, now: float) -> None:
        """A previous daemon's backoff goes on: the restart comes ``delay`` seconds from
        now (its original schedule)."""
        self._intent(True)
        self.backoff_delay = max(0.0, delay)
        self._apply(E.RESUMED, now)

    # -- what happened --------------------------------------------------------------

    def spawned(self, pid: int, now: float) -> None:
        self.pid, self.started_at = pid, now
        self._expired, self._spawn_in_flight = None, False
        ready = not self.ready_notify or self._ready_early
        self._ready_early = False
        self._apply(E.SPAWNED if ready else E.SPAWNED_UNREADY, now)

    def ready(self, now: float) -> None:
        """The current run said READY=1. Before the spawn has returned it is kept for
        ``spawned``; once the run is over (a late datagram) it is moot."""
        if self.pid is None:
            # Only a process of a spawn in flight can have said it; any other is moot.
            self._ready_early = self._spawn_in_flight
            return
        if self.state in LIVE:
            self._apply(E.READY, now)

    def watchdog_ping(self, now: float) -> None:
        """The current run said WATCHDOG=1: its watchdog starts counting again. Not a
        move (no row): only the running state has a watchdog deadline."""
        if self.watchdog is not None and self.state is S.RUNNING and self._expired is None:
            self.deadline = now + self.watchdog

    def spawn_failed(self, why: str, now: float, *, transient: bool) -> None:
        self._ready_early = self._spawn_in_flight = False
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
        if self._expired is not None:
            # The daemon killed it (signal:SIGKILL): say why it did.
            reason, self._expired = self._expired, None
        if self.state is S.STOPPING:
            self.exit_reason = reason.as_stopped()
            self._apply(E.EXIT_STOPPED, now)
            return
        self.exit_reason = reason
        if self.state not in (S.RUNNING, S.STARTING):
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
        """The deadline passed: a backoff ends (a restart), a stop escalates to SIGKILL,
        a run that never said READY=1 or stopped sending WATCHDOG=1 is killed."""
        if not self.timer_due(now):
            return
        self.deadline = None
        event = E.TIMER
        if self.state is S.BACKOFF:
            self.restarts += 1
        elif self.state is S.STARTING:
            event, self._expired = E.START_TIMEOUT, ExitReason(ExitKind.START_TIMEOUT)
        elif self.state is S.RUNNING:
            event, self._expired = E.WATCHDOG, ExitReason(ExitKind.WATCHDOG)
        self._apply(event, now)

    def fail(self, reason: ExitReason, now: float) -> None:
        """Give up on this instance (``internal: …`` or ``backend: …``); the daemon goes on."""
        self.exit_reason = reason
        self.pid = None
        self.want_running = False
        self._expired, self._ready_early, self._spawn_in_flight = None, False, False
        self._actions.clear()
        self._apply(E.FAILURE, now)

    # -- for the performing task ----------------------------------------------------

    def next_action(self) -> Action | None:
        action = self._actions.pop(0) if self._actions else None
        if action is A.SPAWN:
            self._spawn_in_flight, self._ready_early = True, False
        return action

    @property
    def has_actions(self) -> bool:
        return bool(self._actions)

    # -- internals --------------------------------------------------------------------

    def _intent(self, run: bool) -> None:
        self.want_running = run
        self.intent_seq += 1

    def _apply(self, event: Event, now: float) -> None:
        before = self.state
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
        elif event is E.SPAWNED_UNREADY and state is S.STARTING:
            self.deadline = now + self.start_timeout
        elif state is S.RUNNING and before is not S.RUNNING:
            self.deadline = None if self.watchdog is None else now + self.watchdog
        elif state is before and state in (S.STARTING, S.RUNNING):
            pass  # a no-op row (a start while running, a second READY=1) keeps the timer
        elif state is not S.STOPPING:
            self.deadline = None
        if state not in LIVE:
            self.pid = None
        if state in (S.EXITED, S.FATAL):
            self.want_running = False
