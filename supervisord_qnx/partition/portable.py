"""The portable backend: no privileges, any Unix with a Linux-style /proc.

What it enforces, honestly:

* ``memory.max``: *supervised*. The daemon adds up the resident memory of each
  partition's processes; above ``max`` it kills the partition's processes (exit
  reason ``memory-limit``). It looks every ``sample_interval`` at a partition near
  its max or growing fast, up to 16 intervals apart at one far below it
  (``sampling.py``). A fast allocator can overshoot between two samples, so each
  process also gets ``RLIMIT_DATA`` at twice the partition's max: a hard
  per-process ceiling on how far that overshoot can go.
* ``memory.reserved``: *supervised*: crossing ``max - reserved`` raises a
  memory-pressure event (edge-triggered, re-armed when usage falls back).
* ``memory-isolation``: *kernel*: every worker is its own process, and gets
  ``RLIMIT_CORE = 0`` so a crash leaves no dump of tenant memory behind.
* Nothing else: no guaranteed minimum, no CPU budget, no task limit.

Which processes are a partition's: those carrying its leaf tag (``accounting.py``)
among the daemon's descendants. In the daemon (which tells the backend its orphans,
``use_orphan_source``) they are read from the daemon's own process trees: each worker
the backend started and what is below it, and the daemon's orphans
(``partition/proctree.py``), at a cost that follows the tenants, not the machine. A
whole /proc scan remains for partition-wide questions (``stats``, ``destroy``), for a
leaf whose process the wasm fork server started, and without an orphan source.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence

import trio

from supervisord_qnx.partition import (
    accounting,
    container,
    procfiles,
    proctree,
    sampling,
    seccomp,
)
from supervisord_qnx.partition.backend import (
    AttachPlan,
    Backend,
    BackendError,
    BackendEvent,
    BackendOptions,
    Control,
    Enforcement,
    EventKind,
    EventSink,
    LeafExit,
    PartitionStats,
    SpawnRequest,
)
from supervisord_qnx.partition.controls import Flag
from supervisord_qnx.partition.tree import Partition, PartitionTree
from supervisord_qnx.units import format_size

RLIMIT_SLACK = 2  # RLIMIT_DATA = slack * max: the ceiling on overshoot between samples


# The rlimits a worker gets are applied by a tiny exec shim, not ``preexec_fn``:
# ``preexec_fn`` makes subprocess fork (copying the daemon's page tables) and run
# Python in the child, measured at ~5x the spawn floor for 100 workers
# (docs/benchmarks.md); ``sh -c 'ulimit ...; exec "$@"'`` keeps the vfork path and
# costs one small exec. The limits are in force before the worker's own program runs.
_ULIMIT_FLAG = {resource.RLIMIT_DATA: ("-d", 1024), resource.RLIMIT_CORE: ("-c", 512)}


def _shim(argv: list[str], limits: list[tuple[int, int]]) -> list[str]:
    """``argv`` behind a ``/bin/sh`` that sets ``limits`` (soft and hard) and execs it."""
    steps = [
        f"ulimit {_ULIMIT_FLAG[res][0]} {value // _ULIMIT_FLAG[res][1]}" for res, value in limits
    ]
    return ["/bin/sh", "-c", " && ".join([*steps, 'exec "$@"']), "sh", *argv]


def _can_raise_limits() -> bool:
    """Does this process hold CAP_SYS_RESOURCE (needed to raise another's hard limit)?"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 24 & 1)  # CAP_SYS_RESOURCE = 24
    except (OSError, ValueError):
        pass
    return False


class PortableBackend(Backend):
    name = "portable"

    def __init__(self, sample_interval: float = 0.25) -> None:
        self.sample_interval = sample_interval
        self._partitions: dict[str, Partition] = {}
        self._attached: dict[int, str] = {}  # pid -> partition, for attach()
        # A previous daemon's workers this one adopted: not its descendants, yet ours.
        self._adopted: set[int] = set()
        self._limit_killed: set[tuple[str, str]] = set()  # (partition, leaf) killed at max
        # set_owner: a tag counts only beside this owner value (None: the tag alone, as
        # for a backend used without a daemon).
        self.owner: str | None = None
        self._usage: dict[str, int] = {}
        self._peak: dict[str, int] = {}
        self._pressure: dict[str, int] = {}  # pressure events so far, per partition
        self._above: set[str] = set()  # partitions now above max - reserved (edge trigger)
        # When each partition is sampled next, by its headroom (under _lock).
        self._schedule = sampling.SampleSchedule(sample_interval)
        # The sampler's /proc files, kept open between its passes (partition/procfiles.py);
        # one not read for two of the slowest schedule's periods is closed.
        self._files = procfiles.ProcFiles(horizon=2 * sampling.UNLIMITED * sample_interval)
        self._lock = threading.Lock()
        # Leaf membership checks share /proc scans (accounting.SharedScan).
        self._scans = accounting.SharedScan(self._scan)
        # Where a leaf's processes are found without a scan (partition/proctree.py): the
        # process spawn started in it (or the adopted worker), and the daemon's orphans.
        self._roots: dict[tuple[str, str], int] = {}
        self._orphans: Callable[[], list[int]] | None = None
        # Leaves whose process starts elsewhere (the wasm fork server): pid unknown here.
        self._unrooted: set[tuple[str, str]] = set()
        # Set by watch() while it sleeps for want of a partition with a max.
        self._watch_wake: tuple[trio.lowlevel.TrioToken | None, trio.Event | None] = (None, None)

    @classmethod
    def from_options(cls, options: BackendOptions) -> PortableBackend:
        return cls(sample_interval=options.sample_interval)

    @classmethod
    def probe(cls, options: BackendOptions = BackendOptions()) -> str | None:  # noqa: B008, ARG003
        return None if os.path.isdir("/proc/self") else "no /proc to account processes from"

    def enforcement(self) -> Mapping[Control, Enforcement]:
        return {
            Control.MEMORY_MIN: Enforcement.NONE,
            Control.MEMORY_MAX: Enforcement.SUPERVISED,
            Control.MEMORY_RESERVED: Enforcement.SUPERVISED,
            Control.CPU_BUDGET: Enforcement.NONE,
            Control.CPU_MAX: Enforcement.NONE,
            Control.PIDS: Enforcement.NONE,
            Control.MEMORY_ISOLATION: Enforcement.KERNEL,
            Control.CONTAINER: Enforcement.NONE if container.unavailable() else Enforcement.KERNEL,
            Control.SECCOMP: Enforcement.NONE if seccomp.unavailable() else Enforcement.KERNEL,
            Control.CPUSET: Enforcement.NONE,
            Control.CPU_CRITICAL: Enforcement.NONE,
        }

    def describe(self, tree: PartitionTree) -> dict[str, str]:
        return {p.path: f"tag {accounting.TAG}={p.path}:<worker>" for p in tree}

    def set_owner(self, owner: str) -> None:
        self.owner = owner

    def use_orphan_source(self, orphans: Callable[[], list[int]]) -> None:
        self._orphans = orphans

    def reap_leftovers(self) -> list[str]:
        # Nothing of ours outlives the daemon in the OS except processes, and a
        # tag alone cannot tell ours from another daemon instance's: leave them.
        return []

    def create(self, partition: Partition) -> None:
        self._partitions[partition.path] = partition
        if partition.memory_max is not None:
            self._wake_watch()

    def _wake_watch(self) -> None:
        """A partition with a max appeared (a transient job's, created while the daemon
        runs): start accounting if ``watch`` is asleep for want of one; or a partition was
        hurried (a new process, new figures): sample at the next interval if ``watch``
        sleeps until a later partition is due. Callers run in worker threads, hence the
        hand-over through the trio token."""
        token, limited = self._watch_wake
        if token is not None and limited is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(limited.set)

    def update_limits(self, partition: Partition) -> None:
        """The accounting applies the new figures from its next sample; each process's
        ``RLIMIT_DATA`` is set when it starts, so a new cap reaches it at its next start.
        A ``max`` below what the partition uses now is refused: the next sample would
        kill the partition, and a resize never kills."""
        path = partition.path
        old = self._partitions.get(path)
        if old is None:
            raise BackendError(f"partition '{path}' was not created by this backend")
        cap = partition.memory_max
        if cap is not None and (old.memory_max is None or cap < old.memory_max):
            usage, _ = self._tally()
            current = usage.get(path, 0)
            if current > cap:
                raise BackendError(
                    f"partition '{path}': memory.max {format_size(cap)} is below what it "
                    f"uses now ({format_size(current)}); the accounting would kill its "
                    f"processes at the next sample, so the partition keeps its previous "
                    f"figures"
                )
        self._partitions[path] = partition
        with self._lock:
            self._schedule.hurry([path])
        self._wake_watch()

    def adopt(self, tree: PartitionTree) -> None:
        for path in list(self._partitions):
            if path in tree:
                self._partitions[path] = tree[path]

    def destroy(self, path: str) -> None:
        self._kill(self.pids(path))
        for p in list(self._partitions):
            if p == path or p.startswith(path + "/"):
                self._partitions.pop(p, None)
                with self._lock:
                    self._schedule.forget(p)
        with self._lock:
            for key in [k for k in self._roots if k[0] == path or k[0].startswith(path + "/")]:
                del self._roots[key]

    def destroy_all(self, paths: Collection[str]) -> list[tuple[str, Exception]]:
        """All of ``paths`` at once (the daemon's shutdown): one walk of the daemon's own
        trees (``_tally_trees``' walk: each worker and what is below it, the orphans, the
        attached and adopted processes) kills every process of any of them. The default,
        one ``destroy`` per partition, ran a /proc scan and matched every process on the
        machine against each partition: at 100 tenants 0.25 s of a 0.4 s shutdown (issue
        14). Only where a leaf's process started elsewhere (the wasm fork server's), or
        without the daemon's orphans, does a scan remain the way to find them."""
        with self._lock:
            trees = self._orphans is not None and not self._unrooted
            roots = dict(self._roots)
        if not trees:
            return super().destroy_all(paths)
        doomed = set(paths)
        self._kill(self._members_of_any(doomed, roots))
        for p in list(self._partitions):
            if _in_any(p, doomed):
                self._partitions.pop(p, None)
                with self._lock:
                    self._schedule.forget(p)
        with self._lock:
            for key in [k for k in self._roots if _in_any(k[0], doomed)]:
                del self._roots[key]
        self._close_files()
        return []

    def _close_files(self) -> None:
        """Close the sampler's kept /proc files (the shutdown: nothing is sampled after),
        unless a pass is using them this moment (its next sweep closes them then)."""
        if self._files.busy.acquire(blocking=False):
            try:
                self._files.close()
            finally:
                self._files.busy.release()

    def _members_of_any(self, doomed: set[str], roots: Mapping[tuple[str, str], int]) -> list[int]:
        """The processes of the daemon's trees in any partition of ``doomed`` or below
        one: those whose tag (or attachment) says so, and everything below them (the
        rule of ``_members``, on these trees only)."""
        assert self._orphans is not None
        known = {pid: f"{path}:{leaf}" for (path, leaf), pid in roots.items()}
        own = os.getpid()

        def still_ours(proc: accounting.ProcInfo) -> bool:
            return proc.pid not in known or proc.ppid == own or proc.pid in self._adopted

        starts = [*known, *self._orphans(), *self._attached, *self._adopted]
        members: set[int] = set()
        # A parent comes before what is below it (proctree.subtree's order).
        for proc, depth in proctree.subtree(starts, still_ours):
            if proc.ppid in members:
                members.add(proc.pid)
                continue
            tag = known[proc.pid] if depth == 0 and proc.pid in known else None
            if tag is None:
                tag = self._tag_or_attached(proc.pid)
            if tag is not None and _in_any(tag.rsplit(":", 1)[0], doomed):
                members.add(proc.pid)
        members.discard(own)
        return sorted(members)

    def _prepare(self, request: SpawnRequest) -> tuple[list[tuple[int, int]], dict[str, str]]:
        """The rlimits and the leaf tag a new worker gets, however it is started; forgets
        an earlier limit kill of the leaf (a new run begins)."""
        node = self._partitions[request.partition]
        limits: list[tuple[int, int]] = []
        cap = node.effective_memory_max
        if cap is not None:
            limits.append((resource.RLIMIT_DATA, cap * RLIMIT_SLACK))
        if any(Flag.MEMORY_ISOLATION in p.flags for p in (node, *node.ancestors())):
            limits.append((resource.RLIMIT_CORE, 0))
        tag = {accounting.TAG: accounting.tag_value(request.partition, request.leaf)}
        if self.owner is not None:
            # Jobs and forkserver-started workers too, not only what the supervisor spawns.
            tag[accounting.OWNER] = self.owner
        with self._lock:
            self._limit_killed.discard((request.partition, request.leaf))
        return limits, tag

    def _hurry_new_process(self, request: SpawnRequest) -> None:
        """A new process may grow at once: its partitions with a max are sampled at the
        next look. Called once the process is known to the accounting: a pass between a
        hurry and that would find the partition empty, spend the hurry, and leave the
        new process to the slow schedule's turn (seconds)."""
        node = self._partitions[request.partition]
        limited = [p.path for p in (node, *node.ancestors()) if p.memory_max is not None]
        if not limited:
            return
        with self._lock:
            self._schedule.hurry(limited)
        self._wake_watch()  # the sampler may be asleep until a later partition's turn

    def spawn(self, request: SpawnRequest) -> subprocess.Popen[bytes]:
        limits, tag = self._prepare(request)
        argv = _shim(self.exec_argv(request), limits) if limits else self.exec_argv(request)
        proc = subprocess.Popen(argv, **request.popen_kwargs({**request.env, **tag}))
        with self._lock:
            key = (request.partition, request.leaf)
            self._roots[key] = proc.pid
            self._unrooted.discard(key)
        self._hurry_new_process(request)
        return proc

    def attach_plan(self, request: SpawnRequest) -> AttachPlan:
        limits, tag = self._prepare(request)
        with self._lock:
            key = (request.partition, request.leaf)
            self._roots.pop(key, None)
            self._unrooted.add(key)
        # Found by its tag from now on (a /proc scan every pass while it is unrooted).
        self._hurry_new_process(request)
        return AttachPlan(rlimits=tuple(limits), env=tag)

    def attach(self, path: str, pid: int) -> list[int] | None:
        """Count the process (and its descendants) towards ``path`` and give it the
        partition's ``RLIMIT_DATA``; returns the limit it had, for ``detach``. A tag
        cannot be added to a running process's environment, so membership is ours alone."""
        if path not in self._partitions:
            raise BackendError(f"partition '{path}' was not created by this backend")
        node = self._partitions[path]
        cap = node.effective_memory_max
        before = None
        if cap is not None:
            soft, hard = resource.prlimit(pid, resource.RLIMIT_DATA)
            limit = cap * RLIMIT_SLACK
            if _can_raise_limits():
                new = (limit, limit)
            else:
                # Lowering a hard limit cannot be undone without CAP_SYS_RESOURCE, and
                # detach must give the process its limits back: only the soft one then
                # (the sampled accounting still kills the partition at max).
                new = (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard)
            resource.prlimit(pid, resource.RLIMIT_DATA, new)
            before = [int(soft), int(hard)]
        self._attached[pid] = path
        return before

    def detach(self, pid: int, previous: object = None) -> None:
        self._attached.pop(pid, None)
        if isinstance(previous, list | tuple) and len(previous) == 2:
            soft, hard = (int(v) for v in previous)
            try:
                resource.prlimit(pid, resource.RLIMIT_DATA, (soft, hard))
            except PermissionError:
                # Raising a hard limit needs CAP_SYS_RESOURCE, which attach checked before
                # lowering one; lost since (capabilities dropped): restore the soft limit.
                _, now = resource.prlimit(pid, resource.RLIMIT_DATA)
                if now != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > now):
                    soft = now
                resource.prlimit(pid, resource.RLIMIT_DATA, (soft, now))

    def _ours(self, procs: dict[int, accounting.ProcInfo]) -> dict[int, accounting.ProcInfo]:
        """Only the daemon's own descendants (and attached processes) can be ours: another
        daemon's workers may carry the same tag. As child subreaper the daemon keeps even
        a worker's orphans in its subtree."""
        own = os.getpid()
        keep = accounting.members(procs, [own, *self._attached, *self._adopted]) - {own}
        return {pid: procs[pid] for pid in keep}

    def _members(
        self,
        procs: dict[int, accounting.ProcInfo],
        path: str,
        leaf: str | None,
        tags: Mapping[int, str | None] | None = None,
    ) -> set[int]:
        procs = self._ours(procs)
        if leaf is not None:
            exact = accounting.tag_value(path, leaf)
            return accounting.members(procs, (), lambda tag: tag == exact, tags)
        roots = [pid for pid, p in self._attached.items() if p == path or p.startswith(path + "/")]
        return accounting.members(procs, roots, lambda tag: accounting.in_subtree(tag, path), tags)

    def pids(self, path: str, leaf: str | None = None) -> list[int]:
        if leaf is not None:
            found = self._leaf_pids(path, leaf)
            if found is not None:
                return found
        procs, tags = self._scans.get()
        return sorted(self._members(procs, path, leaf, tags))

    def _leaf_pids(self, path: str, leaf: str) -> list[int] | None:
        """A leaf's processes from its own trees (partition/proctree.py): below the
        process started in it, and below the daemon's orphans (what an ended worker left
        is re-parented to the daemon). ``None``: only a scan can tell (no orphan source,
        or the leaf's process was started elsewhere)."""
        key = (path, leaf)
        with self._lock:
            if self._orphans is None or key in self._unrooted:
                return None
            root = self._roots.get(key)
        return self._members_below(root, path, leaf)

    def _members_below(self, root: int | None, path: str, leaf: str) -> list[int]:
        assert self._orphans is not None
        roots = self._orphans()
        if root is not None and self._still_ours(root):
            roots.append(root)
        return proctree.members(roots, accounting.tag_value(path, leaf))

    def _still_ours(self, pid: int) -> bool:
        """A recorded root is still the process recorded (not a reused pid): the
        daemon's child, or an adopted worker still carrying a tag."""
        got = proctree.info(pid)
        if got is None:
            return False
        if got[0].ppid == os.getpid():
            return True
        return pid in self._adopted and accounting.read_tag(pid, self.owner) is not None

    def _scan(self) -> tuple[dict[int, accounting.ProcInfo], dict[int, str | None]]:
        """One /proc snapshot and the tags of the daemon's descendants in it."""
        procs = accounting.snapshot()
        return procs, self._tags(procs)

    def _tags(self, procs: dict[int, accounting.ProcInfo]) -> dict[int, str | None]:
        """The tags of the daemon's descendants among ``procs`` (``None`` for a process
        without one, or with another daemon's owner value)."""
        own, owner = os.getpid(), self.owner
        return {pid: accounting.read_tag(pid, owner) for pid in self._ours(procs) if pid != own}

    def adopt_worker(self, path: str, leaf: str, pid: int) -> None:
        # Its processes (and their descendants) count from now on; the set only grows by
        # the few workers adopted at a start, and a pid no longer alive matches nothing
        # (a reused one would have to carry our tag as well).
        self._adopted.add(pid)
        with self._lock:
            self._roots[(path, leaf)] = pid

    def stats(self, path: str) -> PartitionStats:
        procs = accounting.snapshot()
        return self._stats(procs, path, self._tags(procs))

    def stats_many(self, paths: Sequence[str]) -> dict[str, PartitionStats | Exception]:
        # One /proc scan and one environment read per process for all the partitions,
        # instead of both per partition (100 partitions: seconds instead of milliseconds).
        procs = accounting.snapshot()
        tags = self._tags(procs)
        out: dict[str, PartitionStats | Exception] = {}
        for path in paths:
            try:
                out[path] = self._stats(procs, path, tags)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, per partition
                out[path] = exc
        return out

    def _stats(
        self,
        procs: dict[int, accounting.ProcInfo],
        path: str,
        tags: Mapping[int, str | None] | None = None,
    ) -> PartitionStats:
        pids = self._members(procs, path, None, tags)
        node = self._partitions.get(path)
        current = sum(procs[p].rss for p in pids)
        ticks = sum(procs[p].cpu_ticks for p in pids)
        hz = os.sysconf("SC_CLK_TCK")
        return PartitionStats(
            memory_current=current,
            memory_peak=max(self._peak.get(path, 0), current),
            memory_limit=node.effective_memory_max if node else None,
            memory_pressure_events=self._pressure.get(path, 0),
            cpu_usage_ns=ticks * 1_000_000_000 // hz,
            pids_current=len(pids),
            pids=sorted(pids),
        )

    def leaf_after_exit_now(self, path: str, leaf: str) -> LeafExit | None:
        """On the event loop when the leaf's trees answer (``_leaf_pids``): a few small
        /proc reads (the children lists of the daemon's threads, then only the processes
        below them: kernel memory, no I/O wait), and the limit-kill record, when no
        other thread holds the bookkeeping lock this very moment (else: a thread)."""
        key = (path, leaf)
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self._orphans is None or key in self._unrooted:
                return None  # only a scan can tell: in a thread
            # Its process ended: the record goes (its pid may be reused from now on).
            self._roots.pop(key, None)
            reason = "memory-limit" if key in self._limit_killed else None
            self._limit_killed.discard(key)
        finally:
            self._lock.release()
        return LeafExit(reason, tuple(self._members_below(None, path, leaf)))

    def release_leaf(self, path: str, leaf: str) -> None:
        with self._lock:
            self._roots.pop((path, leaf), None)
            self._unrooted.discard((path, leaf))

    def leaf_exit_reason(self, path: str, leaf: str) -> str | None:
        with self._lock:
            self._roots.pop((path, leaf), None)  # its process ended (the contract)
            if (path, leaf) in self._limit_killed:
                self._limit_killed.discard((path, leaf))
                return "memory-limit"
        return None

    def _kill(self, pids: list[int] | set[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def sample(self) -> list[BackendEvent]:
        """One accounting pass: usage per partition, kills at max; returns the events."""
        events: list[BackendEvent] = []
        now = time.monotonic()
        partitions = dict(self._partitions)
        with self._lock:
            trees = self._orphans is not None and not self._unrooted
            # A /proc scan reads every process anyway: then every partition, each time.
            due = self._schedule.due(partitions, now) if trees else set(partitions)
        if not due:
            return events
        # A due partition's sum needs every process below it: those partitions too.
        look = {p for p in partitions if _in_any(p, due)}
        usage, leaves = self._tally_kept(look, now)
        for path in look:
            node = partitions[path]
            current = usage.get(path, 0)
            self._usage[path] = current
            self._peak[path] = max(self._peak.get(path, 0), current)
            with self._lock:
                self._schedule.sampled(path, current, _nearest_figure(node, current), now)
            if node.memory_max is None:
                continue
            if current > node.memory_max:
                killed = []
                for sub, members in leaves.items():
                    if sub == path or sub.startswith(path + "/"):
                        for leaf, pid in members:
                            with self._lock:
                                self._limit_killed.add((sub, leaf))
                            killed.append(pid)
                self._kill(killed)
                events.append(
                    BackendEvent(
                        EventKind.MEMORY_LIMIT,
                        path,
                        detail={"current": current, "max": node.memory_max, "killed": killed},
                    )
                )
                continue
            threshold = node.pressure_threshold
            above = threshold is not None and current > threshold
            if above and path not in self._above:
                self._pressure[path] = self._pressure.get(path, 0) + 1
                events.append(
                    BackendEvent(
                        EventKind.MEMORY_PRESSURE,
                        path,
                        detail={"current": current, "threshold": threshold},
                    )
                )
            if above:
                self._above.add(path)
            else:
                self._above.discard(path)
        return events

    def _tally_kept(
        self, look: set[str], now: float
    ) -> tuple[dict[str, int], dict[str, set[tuple[str, int]]]]:
        """``_tally(look)`` through the kept /proc files (partition/procfiles.py), unless
        another pass has them this moment (then by path); closes what went unread."""
        if not self._files.busy.acquire(blocking=False):
            return self._tally(look)
        try:
            self._files.begin(now)
            found = self._tally(look, self._files)
            self._files.sweep(now)
            return found
        finally:
            self._files.busy.release()

    def _tally(
        self, look: set[str] | None = None, files: procfiles.PathReads = procfiles.PATHS
    ) -> tuple[dict[str, int], dict[str, set[tuple[str, int]]]]:
        """Resident bytes per partition (ancestors included, as in a cgroup tree) and the
        (leaf, pid) members of each partition: from the daemon's own trees where every
        leaf's process is known (``_tally_trees``), else from one /proc snapshot.
        ``look``: only the workers of these partitions are read (the figures of the
        others are then partial: only their orphans counted). ``files``: how the trees'
        /proc files are read (the sampler's kept ones)."""
        with self._lock:
            trees = self._orphans is not None and not self._unrooted
            roots = dict(self._roots)
        if trees:
            if look is not None:
                roots = {key: pid for key, pid in roots.items() if key[0] in look}
            return self._tally_trees(roots, files)
        procs = accounting.snapshot()
        found = [(procs[pid], self._tag_or_attached(pid)) for pid in set(self._ours(procs))]
        return _add_up(found)

    def _tag_or_attached(self, pid: int) -> str | None:
        tag = accounting.read_tag(pid, self.owner)
        if tag is not None and ":" in tag:
            return tag
        path = self._attached.get(pid)
        return None if path is None else f"{path}:"

    def _tally_trees(
        self, roots: Mapping[tuple[str, str], int], files: procfiles.PathReads = procfiles.PATHS
    ) -> tuple[dict[str, int], dict[str, set[tuple[str, int]]]]:
        """``_tally`` reading only the daemon's trees (partition/proctree.py): each worker
        (its tag is known: spawn set it) and what is below it, the orphans, the attached
        processes. A process's partition is its tag, as in the scan: read for all but
        the workers themselves (the few processes below them). At 1000 workers this is
        two small reads per worker instead of every process on the machine."""
        assert self._orphans is not None
        known = {pid: f"{path}:{leaf}" for (path, leaf), pid in roots.items()}
        own = os.getpid()

        def still_ours(proc: accounting.ProcInfo) -> bool:
            # A worker's pid taken by another process since it ended is not followed:
            # neither it nor what is below it is ours (the scan's `_ours` rule).
            return proc.pid not in known or proc.ppid == own or proc.pid in self._adopted

        found: list[tuple[accounting.ProcInfo, str | None]] = []
        starts = [*known, *self._orphans(), *self._attached]
        trees = proctree.subtree(starts, still_ours, files)
        for proc, depth in trees:
            if depth == 0 and proc.pid in known:
                found.append((proc, known[proc.pid]))
            else:
                found.append((proc, self._tag_or_attached(proc.pid)))
        return _add_up(found)

    async def watch(self, tree: PartitionTree, emit: EventSink) -> None:
        del tree  # every partition of the tree went through create(), and jobs' too
        while True:
            # Nothing to account: no periodic work at all until a partition with a max
            # is created. The event is in place before the check, so a create() between
            # the two still wakes us.
            limited = trio.Event()
            self._watch_wake = (trio.lowlevel.current_trio_token(), limited)
            if any(p.memory_max is not None for p in list(self._partitions.values())):
                break
            await limited.wait()
        while True:
            # In place before the pass: a hurry from now on cuts the long sleep short.
            hurried = trio.Event()
            self._watch_wake = (trio.lowlevel.current_trio_token(), hurried)
            # /proc reads block briefly per process: keep them off the event loop.
            events, idle = await trio.to_thread.run_sync(self._sample_pass)
            for event in events:
                emit(event)
            await trio.sleep(self.sample_interval)
            # Nothing is due for a while (every partition far below its max): no pass
            # until then, not an empty one every interval (each one a wake-up of the loop
            # and a thread; at 1000 idle workers, 15 of every 16 passes found nothing).
            if idle > self.sample_interval:
                with trio.move_on_after(idle - self.sample_interval):
                    await hurried.wait()

    def _sample_pass(self) -> tuple[list[BackendEvent], float]:
        """``sample``, and how long until a partition is due again (0: at the next
        interval; always so with a /proc scan, which reads every partition each pass)."""
        events = self.sample()
        partitions = list(self._partitions)
        with self._lock:
            if self._orphans is None or self._unrooted:
                return events, 0.0
            return events, self._schedule.until_due(partitions, time.monotonic())


def _nearest_figure(node: Partition, usage: int) -> int | None:
    """The figure above ``usage`` the accounting must not miss a crossing of: the
    pressure threshold while below it, else the max; ``None`` without a max."""
    threshold = node.pressure_threshold
    if node.memory_max is None:
        return None
    if threshold is not None and usage <= threshold:
        return threshold
    return node.memory_max


def _in_any(path: str, partitions: set[str]) -> bool:
    """Whether ``path`` is one of ``partitions`` or below one of them."""
    parts = path.split("/")
    return any("/".join(parts[:i]) in partitions for i in range(len(parts), 0, -1))


def _add_up(
    found: list[tuple[accounting.ProcInfo, str | None]],
) -> tuple[dict[str, int], dict[str, set[tuple[str, int]]]]:
    """Usage per partition (each ancestor too) and ``(leaf, pid)`` per partition, from
    processes with their ``path:leaf`` tags (``None``: not in any partition)."""
    usage: dict[str, int] = {}
    leaves: dict[str, set[tuple[str, int]]] = {}
    for proc, tag in found:
        if tag is None:
            continue
        path, leaf, prefixes = _split_tag(tag)
        for prefix in prefixes:
            usage[prefix] = usage.get(prefix, 0) + proc.rss
        leaves.setdefault(path, set()).add((leaf, proc.pid))
    return usage, leaves


@functools.lru_cache(maxsize=8192)
def _split_tag(tag: str) -> tuple[str, str, tuple[str, ...]]:
    """A ``path:leaf`` tag's partition, leaf and the partition with each ancestor. The
    same few tags come back at every sample (one per running worker): split once."""
    path, leaf = tag.rsplit(":", 1)
    parts = path.split("/")
    return path, leaf, tuple("/".join(parts[:i]) for i in range(len(parts), 0, -1))
