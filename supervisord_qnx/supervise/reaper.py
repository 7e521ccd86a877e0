"""Child reaping: exit statuses for the workers, and no zombies from adopted orphans.

Which mechanism tells us a child ended?

* ``pidfd_open`` + poll: one fd per child, exact, Linux >= 5.3 only. QNX has no
  pidfd, and neither does the poll(2) world trio runs in there.
* A thread blocked in ``waitpid(-1)``: steals statuses from anyone else who
  waits for a specific child, and costs a thread.
* ``SIGCHLD`` (through trio's signal receiver, i.e. the wakeup fd) followed by
  ``waitpid(pid, WNOHANG)`` for each child we spawned: works on Linux and QNX
  alike, notification-driven (no polling while idle), and costs one cheap
  syscall per registered child per signal, which stays well under a
  millisecond for a thousand workers. This is what we use.

Orphans: on Linux the daemon is a child subreaper (``PR_SET_CHILD_SUBREAPER``),
so a worker's grandchildren that outlive their parent, even after a
``setsid``, are re-parented to us instead of to init. That is what lets a
stop take down everything a worker left behind; it also means they become
*our* zombies when they die. After a ``SIGCHLD`` that leaves a child to reap which
is no waited-for worker, we look at our own children (``/proc/self/task/*/children``)
and reap every zombie that we did not spawn ourselves.
The one rule that keeps this safe: every process the daemon starts goes through
``spawning()`` (workers) or ``run_utility`` (helper commands such as QNX's ``aps``),
so its status is never taken by the sweep.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import trio

from supervisord_qnx.exits import ExitReason

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Ask Linux to re-parent our orphaned descendants to us. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def note_traced_stop(pid: int, sig: int) -> None:
    """Log a worker that made the daemon its tracer and stopped (nothing else to do)."""
    import structlog  # only on this rare path: the reaper is imported by lighter code

    structlog.get_logger("supervisord_qnx.reaper").warning(
        "a worker made the daemon its tracer (PTRACE_TRACEME) and stopped; it stays "
        "stopped, and a stop of it ends with SIGKILL at its stop_timeout",
        pid=pid,
        signal=sig,
    )


def signal_group(pid: int, sig: int) -> None:
    """Signal a worker's or a job's process group: they lead their own session
    (``start_new_session``), so the group is theirs alone. Falls back to the pid when the
    group is already gone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def describe_status(status: int) -> ExitReason:
    """Turn a raw wait status into an exit reason: ``exit:N`` or ``signal:SIGNAME``."""
    if os.WIFSIGNALED(status):
        return ExitReason.signalled(os.WTERMSIG(status))
    # Only ended children are collected, so anything not signalled exited.
    return ExitReason.exited(os.WEXITSTATUS(status))


class _Slot:
    __slots__ = ("callback", "event", "status")

    def __init__(self) -> None:
        # Made by the first ``wait``: a child watched with ``on_exit`` needs none.
        self.event: trio.Event | None = None
        self.callback: Callable[[int], None] | None = None
        self.status: int | None = None


class ChildReaper:
    """Owns every child of the daemon. Run ``run()`` in the daemon's nursery."""

    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}
        self._lock = threading.Lock()
        self._in_flight = 0  # spawns between fork and registration
        self._own: set[int] = set()  # every pid we started and have not reaped yet
        self.orphans_reaped = 0

    @contextlib.contextmanager
    def spawning(self) -> Iterator[None]:
        """Wrap a spawn (in any thread) so the orphan sweep cannot take the new child."""
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    @property
    def spawns_in_flight(self) -> int:
        """Spawns between fork and registration now (a reexec waits for none)."""
        with self._lock:
            return self._in_flight

    def register(self, pid: int) -> None:
        """Claim ``pid`` (call inside ``spawning()``, before it exits). Thread-safe."""
        with self._lock:
            self._own.add(pid)

    def unreaped(self, pids: Sequence[int]) -> list[int]:
        """Those of ``pids`` that are children this reaper claimed and has not reaped yet
        (a pid already reaped may have been reused by another process). Thread-safe."""
        with self._lock:
            return [pid for pid in pids if pid in self._own]

    def collect(self, pids: Sequence[int]) -> list[int]:
        """Reap those of ``pids`` (claimed children) that have ended; return the others.
        Unlike a sweep, it takes no other child's status (a process someone else in this
        process waits for, such as a test's own child)."""
        left = []
        for pid in pids:
            slot = self._slots.get(pid) or _Slot()
            self._collect(pid, slot)
            if slot.status is None:
                left.append(pid)
            else:
                self._slots.pop(pid, None)
        return left

    def adopt(self, popen: subprocess.Popen[bytes]) -> int:
        """Take over a child started with ``subprocess`` (inside ``spawning()``): the reaper
        owns its status from here on, and ``Popen`` must never wait on (and steal) it."""
        self.register(popen.pid)
        popen.returncode = 0
        return popen.pid

    def run_utility(
        self, argv: Sequence[str], *, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a short helper command to completion (blocking; call from a thread)."""
        with self.spawning():
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.register(proc.pid)
        try:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                # A hung helper must not outlive the call: kill it and collect it.
                proc.kill()
                proc.communicate()
                raise
        finally:
            with self._lock:
                self._own.discard(proc.pid)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    async def wait(self, pid: int) -> int:
        """Wait for a registered child to end; return its raw wait status."""
        slot = self._slots.get(pid)
        if slot is None:
            slot = self._slots[pid] = _Slot()
        if slot.event is None:
            slot.event = trio.Event()
        self._collect(pid, slot)
        if slot.status is None:
            await slot.event.wait()
        self._slots.pop(pid, None)
        assert slot.status is not None
        return slot.status

    def _collect(self, pid: int, slot: _Slot) -> None:
        if slot.status is not None:
            return
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            # Already reaped elsewhere (should not happen); report it as lost.
            got, status = pid, 255 << 8
        if got == pid and os.WIFSTOPPED(status):
            # Not an end: the child made the daemon its tracer (PTRACE_TRACEME) and then
            # got a signal, and a tracer's wait reports that stop whatever the flags.
            # Taken for an exit, it left a stopped copy behind a replacement. It cannot be
            # let go from here: its tracer is the thread that spawned it (PTRACE_DETACH
            # from any other thread is ESRCH). It is the tenant's own stop.
            note_traced_stop(pid, os.WSTOPSIG(status))
            return
        if got == pid:
            slot.status = status
            with self._lock:
                self._own.discard(pid)
            if slot.event is not None:
                slot.event.set()
            self._call_back(pid, slot)

    def _call_back(self, pid: int, slot: _Slot) -> None:
        callback, status = slot.callback, slot.status
        if callback is None or status is None:
            return
        slot.callback = None
        self._slots.pop(pid, None)  # a waiter, if any, holds its slot
        try:
            callback(status)
        except Exception:  # noqa: BLE001 - one watcher's fault must not stop the reaping
            import structlog  # only on this rare path, as above

            structlog.get_logger("supervisord_qnx.reaper").exception(
                "a child's exit callback failed", pid=pid
            )

    def on_exit(self, pid: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(status)`` in the loop once the registered child ``pid`` has
        ended (at once if it already has): ``wait`` without a task. A task waiting in
        ``wait`` for every running worker and another for its log writer cost the daemon
        a few KiB per running worker (issue 14). ``callback`` must not block; what it
        raises is logged, and the reaping goes on."""
        slot = self._slots.get(pid)
        if slot is None:
            slot = self._slots[pid] = _Slot()
        slot.callback = callback
        self._collect(pid, slot)
        self._call_back(pid, slot)  # collected before, by a waiter

    def sweep(self) -> None:
        """Collect every ended child: waited-for workers first, then adopted orphans."""
        # The kernel names an ended child (waitid peeks without reaping): while that is
        # a waited-for worker, collect just it. A SIGCHLD then costs a syscall or two,
        # not one waitpid per worker (1000 at N = 1000, on a restart's path).
        while (pid := _waitable_child()) is not None:
            slot = self._slots.get(pid) if pid > 0 else None
            if slot is None or slot.status is not None:
                break  # another child (an orphan, a helper): the full sweep below
            self._collect(pid, slot)
            if slot.status is None:
                break  # not reaped after all: never spin on it
        else:
            return  # nothing (more) has ended
        for pid, slot in list(self._slots.items()):
            self._collect(pid, slot)
        if _child_waitable():
            # Only a zombie that is not a waited-for worker can be an orphan: the /proc
            # scan below was a fifth of the event loop's time while 100 workers were
            # stopped and SIGKILLed (bench/bench_supervisor.py), almost always for none.
            self._reap_orphans()

    def _reap_orphans(self) -> None:
        with self._lock:
            if self._in_flight:
                return  # a fresh child may not be registered yet; the next SIGCHLD retries
            own = set(self._own)
        # Every thread's children: a zombie is rare here (only when one that is no
        # waited-for worker waits), and this takes any, wherever it was started.
        for pid in _our_children(every_thread=True):
            if pid in own or pid in self._slots:
                continue
            if _is_zombie(pid):
                try:
                    got, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    continue
                if got == pid:
                    self.orphans_reaped += 1

    def orphans(self) -> list[int]:
        """The daemon's children it did not start: a worker's descendants re-parented to
        it (as child subreaper) when their parent ended. Thread-safe; reads one file, the
        main thread's children (``_our_children``). A child being spawned right now (not
        yet registered) may be among them: callers tell them apart by what they look for
        (a leaf's tag)."""
        with self._lock:
            own = set(self._own)
        return [pid for pid in _our_children() if pid not in own]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if signal.getsignal(signal.SIGCHLD) in (signal.SIG_DFL, None):
            # The receiver below puts the handler it found back when it closes. A SIGCHLD
            # the C level caught just before that, and Python handles just after, would
            # then find no Python handler: CPython reports "Signal 17 ignored due to race
            # condition" as an unraisable error (a child exiting during the shutdown; it
            # failed an in-process test). A Python no-op to go back to takes that case,
            # and to the kernel it is the same as the default: children are still waited
            # for, by us.
            signal.signal(signal.SIGCHLD, _late_sigchld)
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            task_status.started()
            self.sweep()
            async for _ in signals:
                self.sweep()


def _late_sigchld(signum: int, frame: object) -> None:
    """SIGCHLD after the reaper stopped listening: nothing to do (see ``run``)."""


def _child_waitable() -> bool:
    """Does any child of ours wait to be reaped? Peeks (``WNOWAIT``) without reaping it, so
    the statuses stay for ``_collect`` and for ``run_utility``'s own wait."""
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False  # no children at all
    except (AttributeError, OSError):
        return True  # no waitid here: sweep every time, as before


def _waitable_child() -> int | None:
    """The pid of one ended child waiting to be reaped (peeked, not reaped); ``None``
    when none is; ``0`` when this system cannot name it (sweep everything then)."""
    try:
        got = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None  # no children at all
    except (AttributeError, OSError):
        return 0
    return None if got is None else got.si_pid


def _our_children(every_thread: bool = False) -> list[int]:
    """The direct children of this process's main thread, from /proc (of every thread
    with ``every_thread``); empty where that is unavailable.

    Every orphan the daemon inherits as child subreaper is a child of the main thread:
    the kernel gives it to the first live thread of the process. The workers and log
    writers are children of the spawn threads (spawnthreads.py), so that one list is
    short: reading every thread's list was 1.5-2.2 ms per worker exit at N = 1000
    (about 2,000 children, each list served a page per read)."""
    if every_thread:
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return []
    else:
        tids = [str(os.getpid())]
    pids: list[int] = []
    for tid in tids:
        try:
            text = Path(f"/proc/self/task/{tid}/children").read_text()
        except OSError:
            continue
        pids.extend(int(p) for p in text.split())
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] == "Z"
