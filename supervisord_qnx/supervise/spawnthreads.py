"""The threads that start the daemon's children: they live as long as the daemon.

Why not trio's worker threads (``trio.to_thread``): one of those ends after 10 s without
work, and to the kernel a process's parent, for ``PR_SET_PDEATHSIG``, is the *thread*
that created it (prctl(2)). A worker that asks for a signal at its parent's death
(``setpriv --pdeathsig``, ``bwrap --die-with-parent``, Go's ``SysProcAttr.Pdeathsig``)
was killed about 10 s after every start, when the idle thread that had spawned it
ended, and restarted, and killed again.

So every spawn of a tenant's process, and the start of a helper server whose forks
become the daemon's children (the log writer server), runs here. The threads are
started as spawns need them, up to ``MOST``, and never end; a spawn is not cancelled
once it runs (as with ``trio.to_thread.run_sync``): the process it starts must not be
lost.

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

    def __init__(self, most: int = MOST) -> None:
        self.most = most
        self._lock = threading.Lock()
        self._threads = 0
        self._idle: list[_Worker] = []  # a stack: the last to finish is at the end
        self._backlog: deque[_Job] = deque()  # jobs waiting for a thread (all busy)

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
                worker.wake.release()
                return
            if self._threads >= self.most:
                self._backlog.append(job)
                return
            self._threads += 1
        thread = threading.Thread(target=self._work, args=(_Worker(job),), name=_NAME)
        thread.daemon = True
        thread.start()

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
                    self._idle.append(worker)
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
