"""The threads that start the daemon's children: they live as long as the daemon.

Why not trio's worker threads (``trio.to_thread``): one of those ends after 10 s without
work, and to the kernel a process's parent, for ``PR_SET_PDEATHSIG``, is the *thread*
that created it (prctl(2)). A worker that asks for a signal at its parent's death
(``setpriv --pdeathsig``, ``bwrap --die-with-parent``, Go's ``SysProcAttr.Pdeathsig``)
was killed about 10 s after every start, when the idle thread that had spawned it
ended, and restarted, and killed again.

So every spawn of a tenant's process, and the start of a helper server whose forks
become the daemon's children (the log writer server, the wasm fork server), runs here.
The threads are started as spawns need them, up to ``MOST``, and never end; a spawn is
not cancelled once it runs (as with ``trio.to_thread.run_sync``): the process it starts
must not be lost. A spawn that does not come back (an exec stuck on a hung network
filesystem) holds its thread: once it counts as stuck (``STUCK_AFTER``), the spawns
queued behind it get a thread more each, up to ``MOST_EVER``.

A second gain: the kernel hands the orphans a child subreaper inherits to its main
thread (the first live thread of the process). With workers and writers on these
threads' lists, the main thread's list of children holds the orphans and little else,
and the portable backend's look for a leaf's orphans at every worker exit reads that
one list (``reaper.orphans``) instead of every child of the daemon: about 2,000 pids
at N = 1000, 1.5-2.2 ms per exit on the restart's path (issue 14).

What a reexec does to them: the exec ends every other thread of the daemon, these
included, so a worker that set a parent-death signal gets it then and the new image
restarts it (the daemon's own pid never changes; the kernel still counts a thread).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

# At most this many threads spawn at once. A start of 1000 workers keeps them busy (a
# spawn waits for its child's exec); more than the CPUs can run still overlap those
# waits. Each idle thread costs its stack's touched pages.
MOST = 8
# A spawn that has not come back after this long is taken for stuck (an exec waiting on
# a hung network filesystem): each such one lets the pool start one more thread, up to
# MOST_EVER, so that the spawns queued behind it do not wait for it.
STUCK_AFTER = 2.0
MOST_EVER = 64

_Job = tuple[Callable[[], Any], Callable[[outcome.Outcome[Any]], None]]


class _Worker:
    """One thread's slot: the job handed to it, and the lock it sleeps on while idle."""

    __slots__ = ("job", "wake")

    def __init__(self, job: _Job) -> None:
        self.job: _Job | None = job
        self.wake = threading.Lock()
        self.wake.acquire()


class SpawnThreads:
    """A pool of threads that never end (see the module docstring).

    A job goes to the thread that went idle last, as in trio's own thread cache: with
    eight threads taking jobs from one queue, whichever woke took it, and a spawn from a
    thread that had slept longest took 0.67 ms instead of 0.13-0.18 ms (a Popen of
    ``sleep 0`` here, measured in the thread)."""

    def __init__(
        self, most: int = MOST, stuck_after: float = STUCK_AFTER, most_ever: int = MOST_EVER
    ) -> None:
        self.most = most
        self.stuck_after = stuck_after
        self.most_ever = max(most, most_ever)
        self._lock = threading.Lock()
        self._threads = 0
        self._idle: list[_Worker] = []  # a stack: the last to finish is at the end
        self._backlog: deque[_Job] = deque()  # jobs waiting for a thread (all busy)
        self._busy: dict[_Worker, float] = {}  # when each busy thread took its job
        self._watching = False  # a timer looks for stuck threads while jobs wait

    @property
    def threads(self) -> int:
        with self._lock:
            return self._threads

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in one of the threads; its result or exception. Not cancelled
        once submitted: a cancellation waits for it (what it started must not be lost)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def deliver(result: outcome.Outcome[Any]) -> None:
            # The run may have ended meanwhile (a daemon torn down mid-spawn): nobody
            # waits for the result then.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._submit((lambda: fn(*args), deliver))
        result: T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._idle:
                worker = self._idle.pop()
                worker.job = job
                self._busy[worker] = time.monotonic()
                worker.wake.release()
                return
            if self._threads >= self.most:
                self._backlog.append(job)
                self._watch()
                return
            worker = self._new_worker(job)
        self._start(worker)

    def _new_worker(self, job: _Job) -> _Worker:
        """Under the lock: a slot for one more thread, busy with ``job``."""
        worker = _Worker(job)
        self._threads += 1
        self._busy[worker] = time.monotonic()
        return worker

    def _start(self, worker: _Worker) -> None:
        thread = threading.Thread(target=self._work, args=(worker,), name=_NAME)
        thread.daemon = True
        thread.start()

    def _watch(self) -> None:
        """Under the lock: look for stuck threads in ``stuck_after``, while jobs wait."""
        if not self._watching:
            self._watching = True
            timer = threading.Timer(self.stuck_after, self._unstick)
            timer.daemon = True
            timer.start()

    def _unstick(self) -> None:
        """Jobs still wait: one more thread for each stuck one (up to ``most_ever``)."""
        started = []
        with self._lock:
            self._watching = False
            now = time.monotonic()
            stuck = sum(1 for since in self._busy.values() if now - since >= self.stuck_after)
            allowed = min(self.most + stuck, self.most_ever)
            while self._backlog and self._threads < allowed:
                started.append(self._new_worker(self._backlog.popleft()))
            if self._backlog:
                self._watch()
        for worker in started:
            self._start(worker)

    def _work(self, worker: _Worker) -> None:
        while True:
            job, worker.job = worker.job, None
            assert job is not None
            fn, deliver = job
            result = outcome.capture(fn)
            # Idle (or on to the next job) before the caller hears back: a caller that
            # spawns again at once then finds this thread, not a reason to start one.
            with self._lock:
                waiting = self._backlog.popleft() if self._backlog else None
                if waiting is None:
                    del self._busy[worker]
                    self._idle.append(worker)
                else:
                    self._busy[worker] = time.monotonic()
            deliver(result)
            if waiting is not None:
                worker.job = waiting
            else:
                worker.wake.acquire()


_NAME = "supervisord-qnx spawn"

# One pool for the whole process: every spawn of the daemon goes through it.
POOL = SpawnThreads()


async def run(fn: Callable[..., T], *args: Any) -> T:
    """``POOL.run``: ``fn(*args)`` in a spawn thread."""
    return await POOL.run(fn, *args)
