"""The worker lifecycle object (pure): every operator call, spawn result, exit, timer and
failure in any order, checked against the promises the supervisor builds on."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from supervisord_qnx.config.model import RestartSpec
from supervisord_qnx.exits import ExitKind, ExitReason
from supervisord_qnx.supervise.policy import backoff_delay, healthy
from supervisord_qnx.supervise.worker import (
    LIVE,
    SETTLED_AFTER_START,
    SETTLED_AFTER_STOP,
    TRANSITIONS,
    Action,
    Event,
    IllegalTransition,
    Lifecycle,
    State,
    next_state,
    transition_table,
)

SPEC = RestartSpec(backoff_initial=0.1, backoff_max=2.0, max_restarts=3, window=10)
OPERATOR = (Event.START, Event.STOP, Event.RESTART)


def drain(lc: Lifecycle) -> list[Action]:
    out = []
    while (a := lc.next_action()) is not None:
        out.append(a)
    return out


def running(lc: Lifecycle, pid: int = 100, now: float = 0.0) -> Lifecycle:
    lc.start(now)
    assert drain(lc) == [Action.SPAWN]
    lc.spawned(pid, now)
    assert lc.state is State.RUNNING
    return lc


# -- the table -----------------------------------------------------------------------


def test_every_operator_call_is_defined_in_every_state() -> None:
    # Operator calls arrive at any moment; a missing row would be a fatal worker.
    missing = [(s, e) for s in State for e in OPERATOR if (s, e) not in TRANSITIONS]
    assert missing == []


def test_illegal_transition_is_an_error() -> None:
    with pytest.raises(IllegalTransition, match="no transition from stopped on spawned"):
        next_state(State.STOPPED, Event.SPAWNED)


def test_transition_table_prints_every_row_with_its_actions() -> None:
    lines = transition_table().splitlines()
    assert lines[0].split() == ["state", "event", "next", "actions"]
    assert len(lines) == len(TRANSITIONS) + 1
    assert "running   stop             stopping  signal" in lines
    assert "running   watchdog         running   kill" in lines


def test_lifecycle_doc_shows_the_table_in_force() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "lifecycle.md").read_text()
    assert transition_table() in doc


# -- policy arithmetic -------------------------------------------------------------


def test_backoff_is_bounded_for_any_streak() -> None:
    assert backoff_delay(0.1, 30.0, 10**6) == 30.0
    assert backoff_delay(0.05, 1e308, 5000) < float("inf")


def test_ten_thousand_restarts_in_a_loop_raise_nothing() -> None:
    # Under the intensity limit for ever (window shorter than the backoff), as the
    # shipped wasm-spinner example is: the delay must stay at the cap, not overflow.
    spec = RestartSpec(backoff_initial=0.05, backoff_max=30, max_restarts=10, window=1)
    lc = Lifecycle(spec, stop_timeout=1)
    now = 0.0
    running(lc, 1, now)
    for pid in range(2, 10_002):
        now += 2.0  # ran 2 s: shorter than backoff_max, so the streak never resets
        lc.exited(ExitReason.parse("exit:1"), now)
        assert lc.state is State.BACKOFF, lc.exit_reason
        assert lc.deadline == pytest.approx(now + lc.backoff_delay)
        assert lc.backoff_delay <= 30
        now = now + lc.backoff_delay
        lc.timer(now)
        assert drain(lc)[-1] is Action.SPAWN
        lc.spawned(pid, now)
    assert lc.restarts == 10_000
    assert lc.backoff_delay == 30


# -- races the daemon used to lose -----------------------------------------------------


def test_stop_during_backoff_then_start_leaves_one_run() -> None:
    lc = running(Lifecycle(SPEC, stop_timeout=1))
    lc.exited(ExitReason.parse("exit:1"), 1.0)
    drain(lc)
    assert lc.state is State.BACKOFF
    lc.stop(1.01)
    assert (lc.state, drain(lc), lc.deadline) == (State.STOPPED, [Action.RELEASE_LEAF], None)
    lc.start(1.02)
    assert (lc.state, drain(lc)) == (State.STARTING, [Action.SPAWN])
    # The old delay is gone: no timer can fire into the new run.
    assert not lc.timer_due(100.0)


def test_start_while_stopping_is_answered_after_the_stop() -> None:
    lc = running(Lifecycle(SPEC, stop_timeout=5))
    lc.stop(1.0)
    assert drain(lc) == [Action.SIGNAL]
    stop_seq = lc.intent_seq
    lc.start(1.1)  # the later intent wins
    assert lc.state is State.STOPPING and lc.intent_seq > stop_seq
    lc.exited(ExitReason.parse("signal:SIGTERM"), 1.2)
    assert lc.state is State.STARTING
    assert drain(lc) == [Action.CLEAR_LEAF, Action.RELEASE_LEAF, Action.SPAWN]


def test_stop_during_spawn_signals_what_the_spawn_started() -> None:
    lc = Lifecycle(SPEC, stop_timeout=5)
    lc.start(0)
    assert drain(lc) == [Action.SPAWN]
    lc.stop(0.001)  # the spawn is still in flight: the task performs the signal after it
    assert lc.state is State.STOPPING and lc.deadline == pytest.approx(5.001)
    lc.spawned(42, 0.002)
    assert drain(lc) == [Action.SIGNAL]  # once, not again for the spawn's answer


def test_stop_timeout_escalates_to_kill() -> None:
    lc = running(Lifecycle(SPEC, stop_timeout=2))
    lc.stop(10.0)
    drain(lc)
    assert not lc.timer_due(11.9)
    lc.timer(12.0)
    assert (lc.state, drain(lc), lc.deadline) == (State.STOPPING, [Action.KILL], None)


def test_transient_spawn_failure_goes_through_the_policy() -> None:
    lc = Lifecycle(SPEC, stop_timeout=1)
    lc.start(0)
    drain(lc)
    lc.spawn_failed("Too many open files", 0.0, transient=True)
    assert lc.state is State.BACKOFF
    assert str(lc.exit_reason) == "spawn-failed: Too many open files"
    lc.timer(lc.deadline or 0)
    assert lc.state is State.STARTING


def test_missing_program_is_fatal_at_once() -> None:
    lc = Lifecycle(SPEC, stop_timeout=1)
    lc.start(0)
    drain(lc)
    lc.spawn_failed("no such program: nope", 0.0, transient=False)
    assert lc.state is State.FATAL and lc.pid is None


def test_failure_while_running_kills_and_is_fatal() -> None:
    lc = running(Lifecycle(SPEC, stop_timeout=1))
    lc.fail(ExitReason(ExitKind.INTERNAL, "RuntimeError: boom"), 1.0)
    assert (lc.state, lc.pid, drain(lc)) == (State.FATAL, None, [Action.KILL, Action.CLEAR_LEAF])
    assert str(lc.exit_reason) == "internal: RuntimeError: boom"


def test_unrunnable_exit_is_fatal_without_a_restart_loop() -> None:
    lc = running(Lifecycle(SPEC, stop_timeout=1))
    lc.exited(ExitReason(ExitKind.INVALID_MODULE, "bad magic"), 0.5)
    assert lc.state is State.FATAL


# -- readiness and watchdog (sd_notify) -------------------------------------------------


def notify_lc(watchdog: float | None = None) -> Lifecycle:
    return Lifecycle(SPEC, stop_timeout=1, ready_notify=True, start_timeout=3, watchdog=watchdog)


def test_notify_worker_is_starting_until_ready() -> None:
    lc = notify_lc()
    lc.start(0)
    drain(lc)
    lc.spawned(7, 0.5)
    assert (lc.state, lc.pid, lc.deadline) == (State.STARTING, 7, 3.5)
    lc.ready(1.0)
    assert (lc.state, lc.deadline, drain(lc)) == (State.RUNNING, None, [])


def test_ready_before_the_spawn_returned_is_kept() -> None:
    lc = notify_lc()
    lc.start(0)
    drain(lc)
    lc.ready(0.1)  # the process was quicker than the spawn's answer
    assert lc.state is State.STARTING
    lc.spawned(7, 0.2)
    assert lc.state is State.RUNNING


def test_no_ready_within_start_timeout_kills_and_says_why() -> None:
    lc = notify_lc()
    lc.start(0)
    drain(lc)
    lc.spawned(7, 0.0)
    assert not lc.timer_due(2.9)
    lc.timer(3.0)
    assert (lc.state, drain(lc), lc.deadline) == (State.STARTING, [Action.KILL], None)
    lc.exited(ExitReason.signalled(9), 3.1)
    assert (lc.state, str(lc.exit_reason)) == (State.BACKOFF, "start-timeout")


def test_missing_watchdog_ping_kills_and_says_why() -> None:
    lc = running(Lifecycle(SPEC, stop_timeout=1, watchdog=2), pid=7, now=0.0)
    assert lc.deadline == 2.0
    lc.watchdog_ping(1.5)
    assert not lc.timer_due(3.4) and lc.timer_due(3.5)
    lc.start(3.0)  # an operator's start on a running worker leaves the watchdog armed
    assert lc.deadline == 3.5
    lc.timer(3.5)
    assert drain(lc) == [Action.KILL]
    lc.exited(ExitReason.signalled(9), 3.6)
    assert (lc.state, str(lc.exit_reason)) == (State.BACKOFF, "watchdog")
    # The next run starts with a fresh watchdog and no borrowed verdict.
    lc.timer(lc.deadline or 0.0)
    lc.spawned(8, 10.0)
    lc.exited(ExitReason.exited(1), 10.5)
    assert str(lc.exit_reason) == "exit:1"


def test_watchdog_counts_from_ready_not_from_spawn() -> None:
    lc = notify_lc(watchdog=1)
    lc.start(0)
    drain(lc)
    lc.spawned(7, 0.0)
    assert lc.deadline == 3.0  # the start timeout, not the watchdog
    lc.ready(2.5)
    assert lc.deadline == 3.5


def test_stop_of_an_unready_worker_signals_it() -> None:
    lc = notify_lc()
    lc.start(0)
    drain(lc)
    lc.spawned(7, 0.0)
    lc.stop(1.0)
    assert (lc.state, drain(lc), lc.deadline) == (State.STOPPING, [Action.SIGNAL], 2.0)


# -- everything, in any order (hypothesis) ----------------------------------------------

EXITS = {
    "clean": ExitReason.exited(0),
    "failed": ExitReason.exited(3),
    "killed": ExitReason.signalled(9),
    "oom": ExitReason(ExitKind.OOM_KILLED),
    "limit": ExitReason(ExitKind.MEMORY_LIMIT),
    "trap": ExitReason(ExitKind.TRAP, "unreachable"),
}


class LifecycleMachine(RuleBasedStateMachine):
    """Random operator calls and facts, with a model of the performing task: a spawn in
    flight blocks the task's other actions; processes end on their own or when signalled;
    timers fire once their deadline passes; a failure can hit at any step."""

    def __init__(self) -> None:
        super().__init__()
        self.spec = RestartSpec(
            policy="always", backoff_initial=0.1, backoff_max=1.0, max_restarts=3, window=5
        )
        self.lc = Lifecycle(self.spec, stop_timeout=1.0)
        self.now = 0.0
        self.expected_reason: ExitKind | None = None  # the verdict the daemon's kill carries
        self.said_ready = False  # the current (or in-flight) run said READY=1
        self.next_pid = 1000
        self.spawning = False
        self.run: int | None = None  # the live process the task watches
        self.policy_restarts: list[float] = []  # policy-granted restarts since last op start
        self.run_started = 0.0  # when the live process was spawned
        # Restarts after short runs in a row since the last healthy run or fresh start:
        # the model of the crash loop whose delay doubles (docs/lifecycle.md).
        self.streak = 0

    # One initializer (hypothesis runs several in no set order): the readiness settings,
    # then, in half the histories, a live worker: random steps reach `running` rarely (a
    # spawn must be started and succeed in a row), and the restart rules live there.
    @initialize(notify=st.booleans(), watchdog=st.sampled_from([None, 0.5, 2.0]), up=st.booleans())
    def readiness(self, notify: bool, watchdog: float | None, up: bool) -> None:
        self.lc = Lifecycle(
            self.spec,
            stop_timeout=1.0,
            ready_notify=notify,
            start_timeout=1.5,
            watchdog=watchdog,
        )
        if up:
            self.op_start()
            self.perform()
            self.spawn_result("ok")
            if notify:
                self.says_ready()

    # operator calls: always legal, and always answered
    def _operator(self, call: str, settled: frozenset[State]) -> None:
        fresh = (State.STOPPED, State.EXITED, State.FATAL, State.BACKOFF)
        if call != "stop" and self.lc.state in fresh:
            self.policy_restarts.clear()  # an operator's start is a fresh try
            self.streak = 0
        getattr(self.lc, call)(self.now)
        self._answered(settled)

    @rule()
    def op_start(self) -> None:
        self._operator("start", SETTLED_AFTER_START)

    @rule()
    def op_stop(self) -> None:
        self._operator("stop", SETTLED_AFTER_STOP)

    @rule()
    def op_restart(self) -> None:
        self._operator("restart", SETTLED_AFTER_START)

    def _answered(self, settled: frozenset[State]) -> None:
        """With a cooperative world (spawns succeed, signals end processes, time passes)
        the call reaches the state that answers it within a few steps."""
        lc = copy.deepcopy(self.lc)
        now, run, spawning = self.now, self.run, self.spawning
        for _ in range(20):
            if lc.state in settled:
                return
            if spawning:
                lc.spawned(1, now)
                run, spawning = 1, False
            elif (a := lc.next_action()) is not None:
                if a is Action.SPAWN:
                    spawning = True
                elif a in (Action.SIGNAL, Action.KILL) and run is not None:
                    if lc.pid == run:
                        lc.exited(ExitReason.parse("signal:SIGTERM"), now)
                    run = None
            elif lc.state is State.STARTING and run is not None and lc.pid == run:
                lc.ready(now)  # a cooperative worker says READY=1
            elif lc.deadline is not None:
                now = max(now, lc.deadline)
                lc.timer(now)
            elif run is not None and lc.pid == run:
                lc.exited(ExitReason.parse("exit:1"), now)
                run = None
        raise AssertionError(f"not answered: stuck in {lc.state}")

    # the performing task
    @precondition(lambda self: self.lc.has_actions and not self.spawning)
    @rule()
    def perform(self) -> None:
        action = self.lc.next_action()
        if action is Action.SPAWN:
            assert self.run is None or self.lc.pid is None, "a second run while one is live"
            self.spawning = True
            self.said_ready = False

    @precondition(lambda self: self.spawning)
    @rule(outcome=st.sampled_from(["ok", "transient", "permanent"]))
    def spawn_result(self, outcome: str) -> None:
        self.spawning = False
        before = self.lc.state
        if outcome == "ok":
            self.next_pid += 1
            self.run = self.next_pid
            self.run_started = self.now
            self.lc.spawned(self.run, self.now)
        else:
            self.lc.spawn_failed("x", self.now, transient=outcome == "transient")
            if before is State.STARTING and self.lc.state is State.BACKOFF:
                self.policy_restarts.append(self.now)
                self._backed_off(uptime=0.0)
            self._auto_started(before)

    def _auto_started(self, before: State) -> None:
        if before is State.STOPPING and self.lc.state is State.STARTING:
            self.policy_restarts.clear()
            self.streak = 0

    def _backed_off(self, uptime: float) -> None:
        """The rule of docs/lifecycle.md: after a healthy run, no delay at all; inside a
        crash loop, backoff_initial doubled once per short run in a row, capped."""
        if healthy(uptime, self.spec):
            assert self.lc.backoff_delay == 0.0
            assert self.lc.timer_due(self.now), "a healthy run's restart must not wait"
            self.streak = 0
        else:
            expected = backoff_delay(self.spec.backoff_initial, self.spec.backoff_max, self.streak)
            assert self.lc.backoff_delay == expected
            assert self.lc.deadline == pytest.approx(self.now + expected)
            self.streak += 1

    @precondition(lambda self: self.run is not None and not self.spawning)
    @rule(kind=st.sampled_from(sorted(EXITS)))
    def process_ends(self, kind: str) -> None:
        pid, self.run = self.run, None
        if self.lc.pid == pid:  # the task ignores a run the lifecycle gave up on
            before = self.lc.state
            expected, self.expected_reason = self.expected_reason, None
            self.lc.exited(EXITS[kind], self.now)
            if before in (State.RUNNING, State.STARTING) and self.lc.state is State.BACKOFF:
                self.policy_restarts.append(self.now)
                self._backed_off(uptime=self.now - self.run_started)
            if expected is not None:
                # Killed for a missing READY=1 or WATCHDOG=1: the reason says so, not SIGKILL.
                assert self.lc.exit_reason is not None
                assert self.lc.exit_reason.kind is expected
            self._auto_started(before)

    # A run that lasts `uptime`, then ends: short of backoff_max (1.0), exactly it, and
    # well past it, so that both sides of the healthy-run boundary come up often.
    @precondition(lambda self: self.lc.state is State.RUNNING and self.run is not None)
    @rule(uptime=st.sampled_from([0.0, 0.5, 0.999, 1.0, 2.5]), kind=st.sampled_from(sorted(EXITS)))
    def run_then_end(self, uptime: float, kind: str) -> None:
        self.now = max(self.now, self.run_started + uptime)
        self.process_ends(kind)

    # what the worker says on its NOTIFY_SOCKET, at any moment (late or early included)
    @rule()
    def says_ready(self) -> None:
        before = self.lc.state
        if self.spawning or self.lc.pid is not None:  # a process of this run can say it
            self.said_ready = True
        self.lc.ready(self.now)
        if before is State.STARTING and self.lc.pid is not None:
            assert self.lc.state is State.RUNNING

    @rule()
    def says_watchdog(self) -> None:
        self.lc.watchdog_ping(self.now)

    @rule(dt=st.floats(min_value=0.0, max_value=3.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        before, due = self.lc.state, self.lc.timer_due(self.now)
        self.lc.timer(self.now)
        if due and before in (State.STARTING, State.RUNNING):
            self.expected_reason = (
                ExitKind.START_TIMEOUT if before is State.STARTING else ExitKind.WATCHDOG
            )
            assert self.lc.next_action() is Action.KILL
            assert self.lc.state is before  # still its run until the process is gone

    @precondition(lambda self: self.lc.deadline is not None)
    @rule()
    def deadline_passes(self) -> None:
        # Straight to the deadline: start timeouts and watchdogs fire often enough to matter.
        assert self.lc.deadline is not None
        self.time_passes(max(0.0, self.lc.deadline - self.now))

    # Not while already fatal (a no-op there): the steps are better spent elsewhere.
    @precondition(lambda self: self.lc.state is not State.FATAL)
    @rule()
    def failure(self) -> None:
        self.spawning = False
        self.expected_reason = None
        self.lc.fail(ExitReason(ExitKind.INTERNAL, "boom"), self.now)

    # promises
    @invariant()
    def settled_states_have_no_pid(self) -> None:
        if self.lc.state not in LIVE:
            assert self.lc.pid is None
        if self.lc.pid is not None:
            assert self.lc.pid == self.run

    @invariant()
    def timers_only_while_waiting(self) -> None:
        lc = self.lc
        if lc.deadline is None:
            return
        if lc.state is State.STARTING:
            # The start timeout: only for a live process that has not said READY=1.
            assert lc.ready_notify and lc.pid is not None
        elif lc.state is State.RUNNING:
            assert lc.watchdog is not None
        else:
            assert lc.state in (State.BACKOFF, State.STOPPING)

    @invariant()
    def notify_workers_run_only_once_ready(self) -> None:
        if self.lc.ready_notify and self.lc.state is State.RUNNING:
            assert self.said_ready

    @invariant()
    def intensity_limit_holds(self) -> None:
        recent = [t for t in self.policy_restarts if self.now - t <= self.spec.window]
        assert len(recent) <= self.spec.max_restarts


TestLifecycleMachine = LifecycleMachine.TestCase
TestLifecycleMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


# -- what the lifecycle records (read by status and the events) ------------------------


def test_exit_reasons_are_recorded_as_the_operator_reads_them() -> None:
    lc = running(Lifecycle(SPEC, stop_timeout=1), pid=7, now=0.0)
    lc.exited(ExitReason.exited(3), 0.5)
    assert (str(lc.exit_reason), lc.pid) == ("exit:3", None)
    lc.timer(lc.deadline or 0.0)
    lc.spawned(8, 1.0)
    lc.stop(1.5)
    lc.exited(ExitReason.signalled(15), 1.6)
    assert str(lc.exit_reason) == "stopped (signal:SIGTERM)"
    assert (lc.state, lc.want_running) == (State.STOPPED, False)


def test_a_healthy_run_restarts_at_once_and_a_short_one_backs_off() -> None:
    spec = RestartSpec(backoff_initial=0.5, backoff_max=2.0, max_restarts=100, window=1)
    lc = running(Lifecycle(spec, stop_timeout=1), now=0.0)
    delays = []
    now = 0.0
    # short, short, short (a crash loop: the delay doubles to the cap), then healthy
    # (at least backoff_max: at once), then short again (the loop starts over), then
    # exactly backoff_max (healthy: the boundary belongs to the healthy side).
    for uptime in (0.1, 0.1, 0.1, 0.1, 5.0, 0.1, 0.1, 2.0):
        now += uptime
        lc.exited(ExitReason.exited(1), now)
        assert lc.state is State.BACKOFF
        delays.append(lc.backoff_delay)
        assert lc.deadline == pytest.approx(now + lc.backoff_delay)
        now += lc.backoff_delay
        lc.timer(now)
        assert drain(lc)[-1] is Action.SPAWN
        lc.spawned(1, now)
    assert delays == [0.5, 1.0, 2.0, 2.0, 0.0, 0.5, 1.0, 0.0]
    assert lc.restarts == 8  # immediate restarts are restarts all the same


@given(
    # Quarter seconds add up exactly in binary floating point, so runs of exactly
    # backoff_max (the boundary) really last backoff_max; any other figure besides.
    uptimes=st.lists(st.sampled_from([0.0, 0.25, 1.75, 2.0, 7.5]) | st.floats(0, 10), max_size=30)
)
def test_backoff_grows_only_inside_a_crash_loop(uptimes: list[float]) -> None:
    # Any sequence of runs ending in failures: a run of at least backoff_max restarts at
    # once; each short run in a row waits backoff_initial doubled once more, capped.
    spec = RestartSpec(backoff_initial=0.25, backoff_max=2.0, max_restarts=1000, window=1)
    lc = running(Lifecycle(spec, stop_timeout=1), now=0.0)
    started, loop = 0.0, 0
    for uptime in uptimes:
        now = started + uptime
        lc.exited(ExitReason.exited(1), now)
        if now - started >= spec.backoff_max:  # the run as the clock measured it
            expected, loop = 0.0, 0
        else:
            expected, loop = min(2.0, 0.25 * 2**loop), loop + 1
        assert (lc.state, lc.backoff_delay) == (State.BACKOFF, expected)
        started = now + expected
        lc.timer(started)
        lc.spawned(1, started)


def test_the_first_crash_of_a_fresh_start_waits_backoff_initial() -> None:
    # A run that dies at once after a start is the beginning of a loop, not news.
    spec = RestartSpec(backoff_initial=5.0, backoff_max=5.0)
    lc = running(Lifecycle(spec, stop_timeout=1), now=0.0)
    lc.exited(ExitReason.signalled(9), 4.9)
    assert (lc.state, lc.deadline) == (State.BACKOFF, pytest.approx(9.9))
    assert not lc.timer_due(9.8)


def test_a_sigkill_after_a_healthy_run_is_due_at_once() -> None:
    spec = RestartSpec(backoff_initial=5.0, backoff_max=5.0)
    lc = running(Lifecycle(spec, stop_timeout=1), now=0.0)
    lc.exited(ExitReason.signalled(9), 5.0)
    assert lc.state is State.BACKOFF and lc.timer_due(5.0)
    assert drain(lc) == [Action.CLEAR_LEAF]
    lc.timer(5.0)
    assert (lc.state, drain(lc), lc.restarts) == (State.STARTING, [Action.SPAWN], 1)


def test_immediate_restarts_still_count_towards_the_intensity_limit() -> None:
    # Healthy runs restart at once, yet dying every 3 s is more than 3 in 10 s: fatal.
    spec = RestartSpec(backoff_initial=0.1, backoff_max=2.0, max_restarts=3, window=10)
    lc = running(Lifecycle(spec, stop_timeout=1), now=0.0)
    now = 0.0
    for _ in range(3):
        now += 3.0
        lc.exited(ExitReason.exited(1), now)
        assert lc.backoff_delay == 0.0
        lc.timer(now)
        lc.spawned(1, now)
    lc.exited(ExitReason.exited(1), now + 3.0)
    assert lc.state is State.FATAL


def test_intent_is_kept_and_every_operator_call_counts() -> None:
    lc = Lifecycle(SPEC, stop_timeout=1)
    seqs = []
    for call in (lc.start, lc.stop, lc.restart, lc.stop):
        call(0.0)
        seqs.append((lc.intent_seq, lc.want_running))
    assert seqs == [(1, True), (2, False), (3, True), (4, False)]


def test_an_illegal_transition_names_its_state_and_event() -> None:
    with pytest.raises(IllegalTransition) as info:
        Lifecycle(SPEC, stop_timeout=1).exited(ExitReason.exited(0), 0.0)
    assert (info.value.state, info.value.event) == (State.STOPPED, Event.EXIT_FINAL)
