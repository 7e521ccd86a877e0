"""Why a worker ended: one vocabulary for the backends, the wasm runner's report, the
restart policy, the lifecycle and the wire.

A reason is an ``ExitReason`` (a kind from ``ExitKind`` plus its detail) everywhere
inside the daemon, so nothing parses strings back to decide anything (``startswith``
on ``"oom-killed"`` once made the guard API report a portable limit kill as a generic
failure). It is rendered as the strings operators and scripts already read::

    exit:N              the process exited with status N
    signal:NAME         it was killed by a signal
    oom-killed          the kernel killed it at its partition's memory max
    memory-limit        the daemon killed its partition at max (supervised backends)
    trap: MESSAGE       a WebAssembly trap
    deadline            fuel or the epoch deadline ran out
    invalid-module: M   the module cannot be compiled or instantiated (never retried)
    runner-error: M     the wasm runner itself failed
    spawn-failed: M     the process could not be started
    internal: M         the daemon's own task for the worker failed
    backend: M          its partition failed and could not be re-created
    watchdog            it stopped sending WATCHDOG=1 within ``watchdog`` seconds (killed)
    start-timeout       a ``ready = "notify"`` worker sent no READY=1 within ``start_timeout``
    stopped (REASON)    any of the above, ended by an operator's stop
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, replace


class ExitKind(enum.StrEnum):
    EXIT = "exit"
    SIGNAL = "signal"
    OOM_KILLED = "oom-killed"
    MEMORY_LIMIT = "memory-limit"
    TRAP = "trap"
    DEADLINE = "deadline"
    INVALID_MODULE = "invalid-module"
    RUNNER_ERROR = "runner-error"
    SPAWN_FAILED = "spawn-failed"
    INTERNAL = "internal"
    BACKEND = "backend"
    WATCHDOG = "watchdog"
    START_TIMEOUT = "start-timeout"


# Kinds written "kind:detail" (a number or a name) rather than "kind: message".
_TERSE = frozenset({ExitKind.EXIT, ExitKind.SIGNAL})
_STOPPED = "stopped ("


@dataclass(frozen=True)
class ExitReason:
    kind: ExitKind
    detail: str = ""
    stopped: bool = False  # ended by an operator's stop

    def __str__(self) -> str:
        if self.kind in _TERSE:
            core = f"{self.kind}:{self.detail}"
        elif self.detail:
            core = f"{self.kind}: {self.detail}"
        else:
            core = str(self.kind)
        return f"{_STOPPED}{core})" if self.stopped else core

    @property
    def failure(self) -> bool:
        """Everything but a clean ``exit:0`` failed (codes, signals, limits, traps)."""
        return not (self.kind is ExitKind.EXIT and self.detail == "0")

    @property
    def permanent(self) -> bool:
        """It will end the same way on every try: restarting would only loop."""
        return self.kind is ExitKind.INVALID_MODULE

    def as_stopped(self) -> ExitReason:
        return replace(self, stopped=True)

    @classmethod
    def exited(cls, code: int) -> ExitReason:
        return cls(ExitKind.EXIT, str(code))

    @classmethod
    def signalled(cls, signum: int) -> ExitReason:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return cls(ExitKind.SIGNAL, name)

    @classmethod
    def parse(cls, text: str) -> ExitReason:
        """Read a rendered reason (the wasm runner's report speaks the wire's words).

        Text that names no known kind is the runner's own failure, kept verbatim."""
        stopped = text.startswith(_STOPPED) and text.endswith(")")
        core = text[len(_STOPPED) : -1] if stopped else text
        head, sep, rest = core.partition(":")
        try:
            kind = ExitKind(head)
        except ValueError:
            return cls(ExitKind.RUNNER_ERROR, text, stopped=False)
        detail = rest if kind in _TERSE else rest.removeprefix(" ")
        return cls(kind, detail if sep else "", stopped)
