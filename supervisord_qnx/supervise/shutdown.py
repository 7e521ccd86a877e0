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

What stays per worker, because a user sees it: the stop signal and the stop timeout, the
wait for the exit, and the run-end mark of its log (the run's last lines are in its
files before it counts as stopped). And where ``after`` asks for order, a tenant's
workers still clear their leaves themselves: the tenants it starts after are stopped
only once nothing of it is left running (a grandchild that left the worker's process
group included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class BulkShutdown:
    """Whether the shutdown has begun, and which workers leave their clean-up to it."""

    def __init__(self, after: Callable[[str], Sequence[str]]) -> None:
        # The tenants a tenant starts after (Ordering.after of the current config).
        self._after = after
        self.begun = False

    def begin(self) -> None:
        """The daemon is shutting down: every partition is removed once all stopped."""
        self.begun = True

    def defers(self, tenant: str, want_running: bool) -> bool:
        """True when a worker of ``tenant`` leaves its leaf's clean-up and its backend
        exit reason to the partitions' removal: the shutdown began, the worker is being
        stopped (not one that ended by itself and will be started again), and no
        ``after`` of its tenant waits for its leaf to be empty."""
        return self.begun and not want_running and not self._after(tenant)
