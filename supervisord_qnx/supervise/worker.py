"""The worker lifecycle: one state machine per worker instance. Pure: no I/O.

Rules of this file:

* Every legal move is one row of ``TRANSITIONS``: (state, event) -> state.
  Anything else is ``IllegalTransition``, so a bug shows up as an error, not
  as a worker quietly stuck in a state nobody can leave.
* The table is data, so the docs and the tests print it (``transition_table``).
* Policy (whether to restart, how long to wait) lives in ``policy.py``; this
  file only says which moves exist.

States::

    stopped   not running, and nobody asked it to (initial, or after stop)
    starting  spawn requested, process not yet confirmed alive
    running   process alive
    backoff   exited, waiting for the restart delay
    stopping  stop signal sent, waiting for exit (SIGKILL after stop_timeout)
    exited    ended and will not be restarted by policy (never / clean exit)
    fatal     restarted too often (intensity limit) or could not be spawned
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FATAL = "fatal"


class Event(enum.StrEnum):
    START = "start"  # operator or autostart asks for it to run
    SPAWNED = "spawned"  # the process exists
    SPAWN_FAILED = "spawn-failed"  # exec failed (no such file, permission...)
    EXIT_RESTART = "exit-restart"  # process ended; policy says restart after a delay
    EXIT_FINAL = "exit-final"  # process ended; policy says leave it
    EXIT_FATAL = "exit-fatal"  # process ended; intensity limit reached
    BACKOFF_DONE = "backoff-done"  # the delay elapsed
    STOP = "stop"  # operator asks it to stop
    STOPPED = "stopped"  # the process (and its partition leaf) is gone after a stop


S, E = State, Event

TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.STOPPED, E.START): S.STARTING,
    (S.EXITED, E.START): S.STARTING,
    (S.FATAL, E.START): S.STARTING,
    (S.STARTING, E.SPAWNED): S.RUNNING,
    (S.STARTING, E.SPAWN_FAILED): S.FATAL,
    (S.RUNNING, E.EXIT_RESTART): S.BACKOFF,
    (S.RUNNING, E.EXIT_FINAL): S.EXITED,
    (S.RUNNING, E.EXIT_FATAL): S.FATAL,
    (S.BACKOFF, E.BACKOFF_DONE): S.STARTING,
    (S.RUNNING, E.STOP): S.STOPPING,
    (S.STARTING, E.STOP): S.STOPPING,
    (S.BACKOFF, E.STOP): S.STOPPED,
    (S.STOPPING, E.STOPPED): S.STOPPED,
    # A process that exits on its own while we are stopping it is simply stopped.
    (S.STOPPING, E.EXIT_RESTART): S.STOPPING,
    (S.STOPPING, E.EXIT_FINAL): S.STOPPING,
    (S.STOPPING, E.EXIT_FATAL): S.STOPPING,
    # Stop is idempotent: asking a worker that is not running to stop is fine.
    (S.STOPPED, E.STOP): S.STOPPED,
    (S.EXITED, E.STOP): S.STOPPED,
    (S.FATAL, E.STOP): S.FATAL,
    (S.STOPPING, E.STOP): S.STOPPING,
    # Start is idempotent too.
    (S.STARTING, E.START): S.STARTING,
    (S.RUNNING, E.START): S.RUNNING,
    (S.BACKOFF, E.START): S.BACKOFF,
}

# States in which the worker has (or is about to have) a live process.
LIVE = frozenset({S.STARTING, S.RUNNING, S.STOPPING})
# States a `start --wait` settles on.
SETTLED_AFTER_START = frozenset({S.RUNNING, S.EXITED, S.FATAL, S.STOPPED})


class IllegalTransition(Exception):
    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"no transition from {state} on {event}")
        self.state = state
        self.event = event


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


def transition_table() -> str:
    """The table as aligned text (printed in docs/lifecycle.md and by the tests)."""
    rows = [("state", "event", "next")] + [(s, e, n) for (s, e), n in TRANSITIONS.items()]
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
