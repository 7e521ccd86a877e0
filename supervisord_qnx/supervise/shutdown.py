"""The daemon's shutdown in bulk: what a stopping worker leaves to the partitions' removal.

Outside a shutdown, every stopped run walks its own chain: exit, its log's run-end mark,
the exit reason from the backend (a thread, under the backend's lock), clearing its leaf
(a thread) and releasing the leaf (a thread, the lock again). At a shutdown of 100
workers that was 300 thread hops queued on two CPUs and one lock (issue 14: 0.5 s to
stop 100 on cgroup1, against 0.1 s asked). Yet the daemon removes every partition right
after, and removing a partition kills what is left in its subtree and removes its leaves
(every backend's ``destroy``), one pass per depth with the partitions of a depth in
parallel (``Daemon._destroy_partitions``). So, once the shutdown began, a worker that
was stopped skips the three per-worker steps and leaves them to that pass:

* the exit reason comes from the wait status (and the launcher's own report), not the
  backend's OOM counters: the run was stopped, which is what its reason says anyway;
* its leaf is neither cleared nor released: the partition's removal kills whatever the
  run left there and removes the leaf with it, before the daemon exits.

Nor does a worker stopped by the shutdown write its log's run-end mark and wait until
its writer has read it (at 100 workers, 100 writer processes woken twice, once for the
mark and once for EOF, while the daemon polled each pipe): it will not run again, so
the daemon closes its copy of the pipe once the exit is seen, and its writer ends the
run's unfinished last line at EOF, as the mark would have, writes out whatever it holds
and exits (docs/logging.md). The daemon waits for those writers once, all together, as
its very last step (``writers_ended``): by then the partitions' removal has killed
whatever a worker left holding its pipe, so every line of every run, a grandchild's
included, is in its files before the daemon exits. The writers ran meanwhile, beside
the rest of the shutdown.

What stays per worker, because a user sees it: the stop signal and the stop timeout, and
the wait for the exit. And where ``after`` asks for order, a tenant's workers still
clear their leaves themselves: the tenants it starts after are stopped only once nothing
of it is left running (a grandchild that left the worker's process group included).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from supervisord_qnx.supervise.reaper import ChildReaper

if TYPE_CHECKING:
    from supervisord_qnx.supervise.launch import Launchers


class BulkShutdown:
    """Whether the shutdown has begun, and which workers leave their clean-up to it."""

    def __init__(self, after: Callable[[str], Sequence[str]]) -> None:
        # The tenants a tenant starts after (Ordering.after of the current config).
        self._after = after
        self.begun = False
        # The log writers whose pipes the daemon let go of since the shutdown began, and
        # the servers that forked them.
        self.writers: list[int] = []

    def begin(self) -> None:
        """The daemon is shutting down: every partition is removed once all stopped."""
        self.begun = True

    def defers(self, tenant: str, want_running: bool) -> bool:
        """True when a worker of ``tenant`` leaves its leaf's clean-up and its backend
        exit reason to the partitions' removal: the shutdown began, the worker is being
        stopped (not one that ended by itself and will be started again), and no
        ``after`` of its tenant waits for its leaf to be empty."""
        return self.begun and not want_running and not self._after(tenant)

    def ends_log_at_eof(self, want_running: bool) -> bool:
        """True when a worker's run, once its exit is seen, leaves the end of its log to
        its writer's EOF instead of a run-end mark the daemon waits for: the shutdown
        began and the worker is being stopped (it will not run again)."""
        return self.begun and not want_running

    async def stop_launchers(self, launchers: Launchers) -> None:
        """Stop what the launchers keep running once every worker stopped: the wasm fork
        server, waited for (it gives back a leaf of its own); the log writer servers
        are only let go of: they end at EOF while the partitions are removed, and are
        waited for with the writers after that, instead of before it."""
        servers = launchers.log_writers.pids
        launchers.log_writers.kill()
        self.writers.extend(servers)
        await launchers.forkserver.stop()

    def writer_closed(self, pid: int) -> None:
        """The daemon closed its copy of this writer's pipe: wait for it at the end."""
        if self.begun:
            self.writers.append(pid)

    async def writers_ended(self, reaper: ChildReaper, timeout: float) -> None:  # noqa: ASYNC109 - a bound, not a deadline of the caller's
        """Wait until every log writer let go of since the shutdown began has ended (its
        last lines are in its files), at most ``timeout`` seconds (a writer waiting for
        room on a full disk). Runs after the daemon's own tasks ended, the reaper's task
        too: it collects these writers itself at each SIGCHLD, and nothing else (the
        reaper's sweep would also take the status of any other child of the process)."""
        pending = reaper.unreaped(self.writers)
        if not pending:
            return
        with trio.move_on_after(timeout), trio.open_signal_receiver(signal.SIGCHLD) as ended:
            # Those that ended before the receiver was in place are collected here.
            pending = reaper.collect(pending)
            if not pending:
                return
            async for _ in ended:
                pending = reaper.collect(pending)
                if not pending:
                    break
