"""The one interface every partition backend implements.

A backend turns the admitted partition tree (pure data, ``partition.tree``)
into something the operating system enforces, and is the only place that
knows how: cgroup files on Linux, APS partitions and rlimits on QNX, rlimits
plus user-space accounting in the portable backend.

Rules every backend keeps:

* **Attach before exec.** ``spawn`` returns a process whose first instruction
  of the tenant's program already runs inside its partition. How is the
  backend's business (a spawning thread moved into the cgroup, an exec shim,
  ``preexec_fn``); the supervisor never attaches after the fact.
* **Honesty.** ``enforcement()`` says, control by control, whether the kernel
  enforces it, the daemon watches it from user space, or nothing does. The
  daemon refuses a config that asks for an unenforced control unless the
  operator chose ``enforcement = "best-effort"``.
* **Only its own.** ``destroy`` and ``reap_leftovers`` touch only what this
  daemon created under its own root.

The interface, in the order the daemon uses it:

==========================  ================================================================
``probe(options)``          class method: ``None`` if it can work here, else the reason
``from_options(options)``   class method: build it (``BackendOptions``; one convention)
``use_utility_runner(run)`` run helper utilities (QNX ``aps``/``on``) through the reaper
``use_orphan_source(fn)``   the daemon's children it did not start (the reaper's word)
``enforcement()``           control -> kernel / supervised / none
``check(tree)``             backend-specific admission problems (pure)
``describe(tree)``          each partition's name in the OS (for ``--check``)
``lock_paths()``            directories to lock before reaping (ownership)
``reap_leftovers()``        kill and remove what a dead daemon left under our root
``create(p)``               make and configure one partition (parent exists)
``recreate(chain)``         make again partitions removed from outside; ``False``: none was
``update_limits(p)``        write a live partition's changed figures in place (reload, set)
``adopt(tree)``             the daemon's tree was replaced: keep these nodes as the records
``spawn(request)``          start a worker already inside its partition's leaf
``attach_plan(request)``    how a process started elsewhere attaches itself (fork server)
``attach(path, pid)``       move a running process in; returns where it was (``Placement``)
``detach(pid, previous)``   move it back to ``previous`` (or the daemon's own context)
``pids(path, leaf)``        live processes of a partition or one worker leaf
``stats(path)``             live figures
``stats_many(paths)``       live figures of several partitions (default: ``stats`` each)
``leaf_exit_reason(..)``    ``oom-killed`` / ``memory-limit`` when the backend knows it
``leaf_after_exit(..)``     that reason and what is left in the leaf, in one call
``leaf_after_exit_now(..)`` the same on the event loop where it cannot block, else ``None``
``kill_leaf(path, leaf)``   async: SIGKILL a worker's leaf until it is empty
``release_leaf(path, lf)``  the worker is stopped for good: drop its leaf
``watch(tree, emit)``       async: the event source (pressure, OOM kills, limit kills)
``destroy(path)``           kill and remove a partition's subtree, deepest first
``destroy_all(paths)``      the same for many at once (the daemon's shutdown)
``close()``                 release descriptors
==========================  ================================================================

Threading contract:

* Every synchronous method may block on file or syscall I/O (cgroupfs writes, a
  helper utility, ``fork``), so the daemon calls them from worker threads
  (``trio.to_thread``), never on the event loop; the pure ones (``probe``-free
  ``enforcement``, ``check``, ``describe``, ``lock_paths``) are the exception.
* Several threads may be inside one backend at once (a spawn, a ``stats`` for
  ``status``, a ``release_leaf``): a backend guards its own bookkeeping with a
  lock, and holds that lock only for bookkeeping, never across a kill, a wait or
  an ``rmdir`` (a process in uninterruptible sleep must not stall everyone else).
* ``kill_leaf`` and ``watch`` are the async methods; ``kill_leaf`` does its
  waiting in a worker thread, ``watch`` runs for the daemon's life in its own task
  (the supervisor restarts it if it fails).
"""

from __future__ import annotations

import abc
import contextlib
import enum
import os
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import trio

from supervisord_qnx.partition import proctime
from supervisord_qnx.partition.controls import Control, Enforcement
from supervisord_qnx.partition.process import ProcessSettings, wrapped_argv
from supervisord_qnx.partition.tree import Partition, PartitionTree

# Control and Enforcement are part of this interface's words; they live in controls.py.
__all__ = ["Control", "Enforcement"]


# How long kill_leaf waits for a leaf to empty after SIGKILL.
KILL_LEAF_TIMEOUT = 2.0


class BackendUnavailable(Exception):
    """The backend cannot work on this machine; ``str()`` is the reason for the operator."""


class BackendError(Exception):
    """An operation on a partition failed (the message names the partition and the file/call)."""


@dataclass(frozen=True)
class SpawnRequest:
    """Everything a backend needs to start one worker process inside a partition.

    ``leaf`` names the worker instance (``"web-0"``); backends that need
    processes only in leaves (cgroup2's no-internal-processes rule) create a
    leaf of that name under ``partition``; others may ignore it.
    """

    partition: str
    leaf: str
    argv: Sequence[str]
    cwd: str | None
    env: Mapping[str, str]
    stdout: int  # an open file descriptor, inherited by the child
    stderr: int
    pass_fds: Sequence[int] = ()
    # Identity, privileges, scheduling: applied after the attach, before the program.
    process: ProcessSettings = field(default_factory=ProcessSettings)

    def popen_kwargs(self, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The ``subprocess.Popen`` settings every backend starts a worker with: no stdin,
        output to the worker's log, only the fds it is given, and its own session so that
        a stop signal reaches its whole process group and nothing of the daemon's."""
        return {
            "cwd": self.cwd,
            "env": dict(self.env if env is None else env),
            "stdin": subprocess.DEVNULL,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "pass_fds": tuple(self.pass_fds),
            "close_fds": True,
            "start_new_session": True,
        }


@dataclass(frozen=True)
class AttachPlan:
    """How a process started outside ``spawn`` puts *itself* into a worker's partition,
    before running any tenant code (the wasm fork server's workers, ``wasm/forkserver.py``).

    The process applies it in order: writes its own pid into each ``procs`` file
    (cgroup ``cgroup.procs``), sets each rlimit (soft = hard = value), and adds
    ``env`` to its environment (the portable backend's leaf tag).
    """

    procs: tuple[str, ...] = ()
    rlimits: tuple[tuple[int, int], ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "procs": list(self.procs),
            "rlimits": [list(r) for r in self.rlimits],
            "env": dict(self.env),
        }


@dataclass(frozen=True)
class LeafExit:
    """A worker leaf just after its main process ended (``Backend.leaf_after_exit``)."""

    reason: str | None  # ``oom-killed`` / ``memory-limit`` when the backend knows it
    # Processes still in the leaf (grandchildren). Empty: nothing to clear, and nothing
    # can enter an empty leaf but the daemon's next spawn into it.
    members: tuple[int, ...] = ()


@dataclass
class PartitionStats:
    """Live figures for one partition, as the kernel (or the daemon's accounting) reports them.

    ``None`` means "this backend cannot tell", never zero.
    """

    memory_current: int | None = None
    memory_peak: int | None = None
    memory_limit: int | None = None
    memory_pressure_events: int = 0
    oom_kills: int | None = None
    cpu_usage_ns: int | None = None
    cpu_throttled_ns: int | None = None
    pids_current: int | None = None
    pids: list[int] = field(default_factory=list)


class EventKind(enum.StrEnum):
    MEMORY_PRESSURE = "memory-pressure"  # usage crossed max - reserved
    MEMORY_LIMIT = "memory-limit"  # the daemon killed the partition at max (user-space)
    OOM_KILL = "oom-kill"  # the kernel killed a process of the partition


@dataclass(frozen=True)
class BackendEvent:
    kind: EventKind
    partition: str
    leaf: str | None = None
    detail: Mapping[str, object] = field(default_factory=dict)


EventSink = Callable[[BackendEvent], None]

# Where a process sat before ``attach`` moved it: JSON-able (lists, dicts, strings,
# numbers or None), because the daemon persists it to restore the process after a crash.
Placement = Any


# Runs a helper utility (QNX's ``aps``/``on``) to completion and returns its result.
UtilityRunner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True)
class BackendOptions:
    """Everything any backend is built from: one constructor convention for all."""

    cgroup_root: str | None = None  # our root under the daemon's cgroup (cgroup backends)
    instance: str | None = None  # a suffix that keeps test and parallel roots apart
    sample_interval: float = 0.25  # how often supervised figures are sampled, seconds
    # How to run helper utilities. Inside the daemon: the child reaper's ``run_utility``,
    # because the reaper collects every child it does not know (adopted orphans) and a
    # plain wait would lose the helper's exit status to it. None: plain subprocess.run.
    run_utility: UtilityRunner | None = None


class Backend(abc.ABC):
    """Turns partitions into enforced OS resources. See the module docstring for the rules."""

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def probe(cls, options: BackendOptions = BackendOptions()) -> str | None:
        """Return ``None`` if this backend can work here, else the reason it cannot."""

    @classmethod
    @abc.abstractmethod
    def from_options(cls, options: BackendOptions) -> Backend:
        """Build the backend (after ``probe`` said it can work)."""

    def use_utility_runner(self, runner: UtilityRunner) -> None:
        """Run helper utilities through ``runner`` from now on. The daemon passes its
        child reaper's (see ``BackendOptions.run_utility``); backends that run no
        helpers ignore it."""
        return None

    def use_orphan_source(self, orphans: Callable[[], list[int]]) -> None:
        """``orphans()`` lists the daemon's children that it did not start (a worker's
        descendants re-parented to the daemon as child subreaper; the reaper knows).
        A backend that finds a leaf's processes from its own records (portable) uses it;
        others ignore it."""
        return None

    def lock_paths(self) -> list[Path]:
        """Directories whose lock says "this daemon owns what is under them" (the cgroup
        roots); the daemon locks them before reaping anything. Default: none."""
        return []

    @abc.abstractmethod
    def enforcement(self) -> Mapping[Control, Enforcement]:
        """Say, for every ``Control``, how this backend enforces it."""

    def check(self, tree: PartitionTree) -> list[str]:
        """Backend-specific admission (name mapping, platform limits). Pure; returns problems."""
        return []

    def describe(self, tree: PartitionTree) -> dict[str, str]:
        """How each partition path appears in the OS (cgroup dir, APS name); for ``--check``."""
        return {}

    @abc.abstractmethod
    def reap_leftovers(self) -> list[str]:
        """Kill and remove what a dead daemon left under our root; return what was reaped."""

    @abc.abstractmethod
    def create(self, partition: Partition) -> None:
        """Create and configure one partition; its parent already exists."""

    def recreate(self, chain: Sequence[Partition]) -> bool:
        """Create again partitions that vanished from outside (removed by hand while the
        daemon ran). ``chain`` is in creation order: the worker's partition's ancestors,
        the partition, its descendants. Returns whether anything was missing (and is now
        back); ``False`` (the default, for backends whose partitions cannot vanish behind
        the daemon's back) tells the caller the failure had another cause."""
        return False

    def update_limits(self, partition: Partition) -> None:
        """Change a live partition's figures in place to ``partition``'s (reload, ``set``):
        no process is restarted. Writes only the figures that differ from the ones this
        backend last applied; if the OS refuses one (cgroup v1 answers ``EBUSY`` to a
        memory limit below what the partition uses and cannot reclaim), the figures
        already written are put back and ``BackendError`` says which file and why: the
        partition is then as it was. On success ``partition`` is the backend's record."""
        raise BackendError(
            f"partition '{partition.path}': the {self.name} backend cannot change limits "
            "in place; restart the daemon to apply them"
        )

    def adopt(self, tree: PartitionTree) -> None:
        """The daemon replaced its tree (after a reload or ``set``): from now on the
        records of partitions this backend created are ``tree``'s nodes, so that limits
        inherited from ancestors resolve in the new tree. Default: nothing is recorded."""
        return None

    @abc.abstractmethod
    def destroy(self, path: str) -> None:
        """Kill every process left in the partition's subtree and remove it, deepest first."""

    # Threads removing partitions in destroy_all's default.
    DESTROY_THREADS = 8

    def destroy_all(self, paths: Collection[str]) -> list[tuple[str, Exception]]:
        """``destroy`` every partition of ``paths`` (what the daemon created; parents may
        be among them), deepest first; returns the ``(path, error)`` of those that failed,
        having tried every other. Blocking.

        Default: the partitions of one depth at the same time (independent of each other;
        the portable backend's /proc scans are then shared), one depth after another.
        A backend that can kill and remove everything in one pass overrides it."""
        failures: list[tuple[str, Exception]] = []

        def destroy(path: str) -> None:
            try:
                self.destroy(path)
            except Exception as exc:  # noqa: BLE001 - remove every other partition anyway
                failures.append((path, exc))

        depths = sorted({p.count("/") for p in paths}, reverse=True)
        with ThreadPoolExecutor(self.DESTROY_THREADS, "destroy") as pool:
            for depth in depths:
                list(pool.map(destroy, sorted(p for p in paths if p.count("/") == depth)))
        return failures

    @abc.abstractmethod
    def spawn(self, request: SpawnRequest) -> subprocess.Popen[bytes]:
        """Start a worker process already inside its partition. Blocking: call from a thread."""

    def exec_argv(self, request: SpawnRequest) -> list[str]:
        """The argv a backend execs for ``request``: the worker's own behind the wrappers that
        apply ``request.process`` (``partition/process.py``). A backend whose launcher has
        options of its own for these settings overrides it."""
        return wrapped_argv(request.process, request.argv)

    def delegate(self, path: str, uid: int, gid: int) -> None:
        """Hand the partition's directory to ``uid``/``gid`` so that it may create
        sub-partitions and move its own processes among them, never change the limits
        of the partition itself (systemd's ``Delegate=``; docs/security.md#tenants).
        Default: this backend has nothing to hand over."""
        raise BackendError(f"partition '{path}': the {self.name} backend cannot delegate")

    def attach_plan(self, request: SpawnRequest) -> AttachPlan | None:
        """Prepare the request's leaf as ``spawn`` would, and say how a process started by
        someone else attaches itself to it; ``None`` (the default) when this backend can
        only attach through ``spawn`` (QNX APS joins through ``on``). Blocking."""
        return None

    @abc.abstractmethod
    def attach(self, path: str, pid: int) -> Placement:
        """Move a running process into a partition (the origin design's ``attach_process``).

        Returns where the process was before (its cgroups, its rlimit): plain JSON data
        that ``detach`` takes back, which the daemon keeps (and persists) meanwhile.
        The caller has checked that ``pid`` is a live process it may move."""

    @abc.abstractmethod
    def detach(self, pid: int, previous: Placement = None) -> None:
        """Move a process out of our partitions: back to ``previous`` (what ``attach``
        returned) where the backend can, else to the daemon's own context (the origin design's
        ``detach_process``)."""

    @abc.abstractmethod
    def pids(self, path: str, leaf: str | None = None) -> list[int]:
        """Every live process in the partition (or one worker leaf of it), descendants included."""

    @abc.abstractmethod
    def stats(self, path: str) -> PartitionStats:
        """Live figures for the partition and its subtree."""

    def stats_many(self, paths: Sequence[str]) -> dict[str, PartitionStats | Exception]:
        """``stats`` of several partitions in one call (``metrics`` reads them all): each
        path's figures, or the exception reading them raised, so that one partition's
        failure stays its own. Backends whose figures come from one shared scan (the
        portable accounting reads all of /proc per ``stats``) override it to scan once."""
        out: dict[str, PartitionStats | Exception] = {}
        for path in paths:
            try:
                out[path] = self.stats(path)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, per partition
                out[path] = exc
        return out

    def leaf_exit_reason(self, path: str, leaf: str) -> str | None:
        """If the backend knows why a worker leaf's process died (``oom-killed``), say so.

        Called once after the worker's main process exited, before the leaf is
        reused; return ``None`` when the backend has nothing to add.
        """
        return None

    def leaf_after_exit(self, path: str, leaf: str) -> LeafExit:
        """``leaf_exit_reason`` and the processes still in the leaf, in one call: after a
        worker's main process ended, one thread hop instead of two (the exit reason, then
        clearing the leaf). Blocking."""
        me = os.getpid()  # never: a daemon thread can sit in a leaf mid-spawn
        reason = self.leaf_exit_reason(path, leaf)
        return LeafExit(reason, tuple(p for p in self.pids(path, leaf) if p != me))

    def leaf_after_exit_now(self, path: str, leaf: str) -> LeafExit | None:
        """``leaf_after_exit`` answered at once, on the event loop, by a backend that can
        do it without blocking (reads of a few small kernel files, no lock another thread
        may hold); ``None`` (the default): call ``leaf_after_exit`` in a thread."""
        return None

    async def kill_leaf(self, path: str, leaf: str) -> list[int]:
        """SIGKILL every process in a worker's leaf (grandchildren that left its session
        included) and return once the leaf is empty. Returns the pids still there after
        ``KILL_LEAF_TIMEOUT`` (a process stuck in uninterruptible sleep): the caller
        logs them; the leaf is then not reused until they are gone. Async: the waiting
        happens in a worker thread, never on the event loop."""
        return await trio.to_thread.run_sync(self._kill_leaf_blocking, path, leaf)

    def _kill_leaf_blocking(self, path: str, leaf: str) -> list[int]:
        me = os.getpid()  # never: a daemon thread can sit in a leaf mid-spawn
        deadline = time.monotonic() + KILL_LEAF_TIMEOUT
        delay = 0.0005
        while True:
            pids = [pid for pid in self.pids(path, leaf) if pid != me]
            if not pids:
                return []
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                return pids
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def set_owner(self, owner: str) -> None:
        """This daemon's owner value (``SUPERVISORD_QNX_OWNER``, supervise/leftovers.py),
        given before any partition is created. Backends that find a partition's processes
        by their environment tag (portable, qnx) put it in every process they start and
        count only processes that carry it: another daemon's workers may carry the same
        tag. The kernel backends need nothing."""
        del owner

    # -- adoption (supervise/adopt.py): a previous daemon's workers still running ------

    def leaf_members(self, path: str, leaf: str) -> list[int] | None:
        """The processes the kernel itself holds in a worker's leaf (cgroup.procs), read
        without any bookkeeping of this daemon (a previous one made the leaf); ``None``
        where the backend has no kernel record to cross-check (portable, QNX). Blocking."""
        return None

    def process_clock(self) -> proctime.LinuxClock | proctime.QnxClock:
        """How a process is named across daemon lifetimes here (pid + start time, and
        the boot): ``partition/proctime.py``. Default: Linux ``/proc/PID/stat``."""
        return proctime.LINUX

    def reap_leftovers_keeping(self, keep: Collection[tuple[str, str]]) -> list[str]:
        """``reap_leftovers``, sparing the worker leaves ``(path, leaf)`` whose processes
        are adopted (and their ancestors). Backends that reap nothing need no override."""
        return self.reap_leftovers()

    def adopt_worker(self, path: str, leaf: str, pid: int) -> None:
        """Take ``pid``, a previous daemon's worker in ``path``/``leaf``, as this daemon's
        own (its leaf bookkeeping; the portable accounting counts it, though it is not
        this daemon's descendant). Blocking. The default has nothing to record."""
        return None

    def release_leaf(self, path: str, leaf: str) -> None:
        """The worker instance is gone for good (tenant stopped); drop its leaf if it has one."""
        return None

    async def watch(self, tree: PartitionTree, emit: EventSink) -> None:
        """Run for the daemon's life, turning kernel or sampled conditions into events.

        The default has nothing to watch and returns at once.
        """
        return None

    def close(self) -> None:
        """Release file descriptors etc.; partitions are removed by ``destroy``."""
        return None


def unenforced(backend: Backend, tree: PartitionTree) -> list[tuple[str, Control]]:
    """Every (partition path, control) the tree asks for that this backend enforces neither
    in the kernel nor by supervision."""
    levels = backend.enforcement()
    return [
        (node.path, control)
        for node in tree
        for control in node.requested_controls()
        if levels.get(control, Enforcement.NONE) is Enforcement.NONE
    ]
