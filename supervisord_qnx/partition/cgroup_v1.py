"""The cgroup v1 backend: one hierarchy per controller, the same tree mirrored in each.

Layout
======

Our root is ``<the daemon's own cgroup>/supervisord-qnx`` in every hierarchy we use
(``memory`` - required - and ``cpu``, ``cpuacct``, ``pids`` when mounted; co-mounted
controllers such as ``cpu,cpuacct`` share one directory tree). Rooting under the daemon's
*own* cgroup rather than at each mount root was deliberate:

* limits an operator or container runtime put on the daemon (a systemd slice, the
  sandbox's ``/process_api/<id>`` memory cgroup on our CI machine) keep covering the
  tenants - they cannot escape the box the daemon was started in;
* it is the only place we may write when the daemon's subtree is delegated to it
  (systemd ``Delegate=yes`` works for v1 hierarchies too), and it is the same choice the
  cgroup2 backend must make, so both backends behave alike;
* two daemons (or test runs) in different cgroups cannot collide, and ``instance``
  separates those that share one.

``daemon.cgroup_root`` overrides the name (relative: under the own cgroup) or gives an
absolute path from the mount roots. A partition ``a/b`` is ``<root>/a/b`` in each hierarchy;
a worker leaf ``web-0`` of tenant ``tenants/web`` is ``<root>/tenants/web/@web-0`` (``@`` is
outside the partition-name alphabet, so leaves never clash with child partitions). Leaves
exist in v1 not because the kernel demands it (v1 allows processes in inner cgroups) but
so OOM kills, memory and CPU can be attributed to one worker.

Fewer directories
-----------------

Every directory is one ``rmdir`` at shutdown, and the kernel takes them one at a time
under its cgroup mutex (50-150 µs each here; one thread per hierarchy was measured and
was no faster): with a partition and a leaf mirrored in five hierarchies, 10 per worker
were most of a 100-worker shutdown (issue 14). So a directory exists only where it
does something:

* a worker's leaf is made in ``memory`` (its OOM kills, usage and processes, per
  worker) and ``cpu`` (one CFS group per worker, so a worker that forks many processes
  weighs as one among its siblings; its RT runtime) only. In ``cpuacct`` and ``pids``
  it sits in its partition's directory: CPU usage is read per partition, and
  ``pids.max`` is a partition's limit, which counts it there just the same;
* a partition has a directory in a cpuset-only hierarchy only if it or an ancestor sets
  ``cpuset`` (decided at its creation; a reload does not rewrite a cpuset). Elsewhere
  its workers join the nearest cpuset directory above, or, with none set on the way,
  stay in the daemon's own cpuset (our root holds the same CPUs): one move fewer per
  spawn. A new cpuset directory also costs ~1 ms to make.

Removal always looks at a partition's (and a leaf's) place in every hierarchy, so what
an older daemon made there (a leaf in every hierarchy, adopted by a restart) goes too.

Settings
========

=================  =========================================================  ==========
control            files                                                      enforced
=================  =========================================================  ==========
memory.max         ``memory.limit_in_bytes`` (+ ``memory.memsw.limit_in_bytes``) kernel
memory.reserved    ``memory.soft_limit_in_bytes`` = max - reserved, and an    supervised
                   eventfd threshold on ``memory.usage_in_bytes``
memory.min         - (v1 has no protection; a soft limit orders reclaim only) none
cpu.budget         ``cpu.shares`` = budget% x 1024 (1 % = the kernel default)  kernel
cpu.max            ``cpu.cfs_quota_us`` = max% x ncpu x ``cfs_period_us``       kernel
pids               ``pids.max``                                               kernel
memory-isolation   every worker is its own process: MMU-separated             kernel
container          no namespaces here                                         none
=================  =========================================================  ==========

Swap: with swap accounting (``memory.memsw.*`` present) we set the memory+swap limit to the
same ``max``, so ``max`` caps RAM *and* swap - a tenant cannot spill past its cap into swap.
Without swap accounting we set ``memory.swappiness = 0`` so reclaim in the cgroup does not
swap the tenant's anonymous memory out (which would let it use more than ``max`` in total).

``cpu.shares`` is relative among siblings, so mapping every budget with the same factor
keeps the budgets' ratios; a partition without a budget keeps the default 1024 (= a 1 %
budget) and lives on borrowed idle CPU. Our root keeps its default share: how much of the
machine the whole daemon gets against the rest of the system is the operator's decision.

Attach before exec: the spawn strategies
========================================

The worker must run its first instruction inside its leaf. Three ways, all implemented
(``spawn_strategy``), measured by ``bench/bench_spawn.py``:

* ``"thread"``: v1 moves single *threads* (a TID written to ``tasks``). The spawning
  thread moves itself into the leaf in every hierarchy, forks with plain
  ``subprocess.Popen`` - the child is born in its parent thread's cgroups - and moves itself
  back in ``finally``. ``subprocess`` keeps its ``vfork`` fast path and concurrent spawns
  need no lock (each thread only moves itself). But every move takes the kernel's
  ``cgroup_threadgroup_rwsem`` for writing (an RCU grace period each time), and this
  strategy does 2 x (number of hierarchies) moves on the daemon's critical path.
* ``"preexec"``: ``preexec_fn`` writes the child's pid to ``cgroup.procs``. Correct, but it
  forces a full ``fork`` of the (large) daemon instead of ``vfork``, and running Python
  between fork and exec in a threaded daemon risks deadlocks on locks other threads held.
* ``"shim"`` (default): exec ``/bin/sh -c 'echo 0 > .../tasks ...; exec "$@"'``.
  Keeps vfork, and the migrations happen in the child, off the daemon's critical path and
  in parallel with the next spawn; the worker's first instruction still runs inside (the
  shell attaches, then execs the worker under the same pid; if the leaf vanished
  meanwhile the shell exits 126 and the worker never runs). The shell moves its one
  thread (``0`` into ``tasks``), which the kernel does without the global
  ``cgroup_threadgroup_rwsem``, and tells the spawning thread it is in by letting go of
  its stdin pipe (``cgroupfs.JOIN_SHIM``). Measured on the CI machine,
  100 spawns timed until every worker sits in its leaf (best of 5, loaded 2-CPU VM):
  floor 178 ms, shim 238-265 ms (1.3-1.5x), thread 554-616 ms (3.1-3.5x), preexec
  ~1000 ms (5.5x). Hence the default; the cgroup2 backend uses the same shim.

A moved thread's own page faults are still charged to the daemon's memory cgroup (v1
charges pages to the mm owner, the main thread), so the move does not bill the tenant for
the daemon or vice versa; and the daemon's pid never appears in the leaf's ``cgroup.procs``
(v1 lists a process there only when its thread-group leader is a member), so ``destroy``
cannot mistake the daemon for a tenant - it also refuses to signal its own pid.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from supervisord_qnx.partition import cgroupfs as fs
from supervisord_qnx.partition import container, seccomp
from supervisord_qnx.partition import rt_cgroup as rtcg
from supervisord_qnx.partition.backend import (
    AttachPlan,
    BackendError,
    BackendOptions,
    BackendUnavailable,
    Control,
    Enforcement,
    PartitionStats,
    SpawnRequest,
)
from supervisord_qnx.partition.tree import Partition, PartitionTree

SpawnStrategy = Literal["thread", "preexec", "shim"]
CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "cpuset")
# The hierarchies where each worker gets a leaf of its own (see "Fewer directories" in
# the module docstring): memory (its OOM kills, usage and processes, per worker) and cpu
# (its CFS group: a worker that forks many processes weighs as one among its siblings;
# its RT runtime). In the others a worker joins its partition's directory.
LEAF_CONTROLLERS = frozenset({"memory", "cpu"})


@dataclass(frozen=True)
class Hierarchy:
    """One mounted v1 hierarchy we use, and our root directory in it."""

    controllers: frozenset[str]
    mount: fs.Mount
    own: str  # the daemon's cgroup in this hierarchy, relative to the mount
    root: Path


def shares_for(budget: float | None) -> int | None:
    """``cpu.shares`` for a budget in percent of the machine (1 % ↔ the default 1024)."""
    if budget is None:
        return None
    return max(2, min(262_144, round(budget * 1024)))


def _discover(
    cgroup_root: str | None, instance: str | None, mountinfo: str | None, self_cgroup: str | None
) -> dict[str, Hierarchy]:
    own = fs.own_cgroups(self_cgroup)
    found: dict[str, Hierarchy] = {}
    for mount in fs.cgroup_mounts(mountinfo):
        if mount.fstype != "cgroup":
            continue
        ctrls = frozenset(c for c in CONTROLLERS if c in mount.options)
        if not ctrls or any(c in found for c in ctrls):
            continue  # not ours, or a second (bind) mount of a hierarchy we have
        own_path = fs.relative_to_mount(own.get(next(iter(ctrls)), "/"), mount)
        root = fs.root_dir(mount.mountpoint, own_path, cgroup_root, instance)
        h = Hierarchy(ctrls, mount, own_path, root)
        for c in ctrls:
            found[c] = h
    return found


def _cpuset_only(h: Hierarchy) -> bool:
    """A hierarchy of the cpuset controller alone, whose partition directories exist only
    where a cpuset is in force (co-mounted with another controller, it has them all)."""
    return h.controllers == {"cpuset"}


def _no_tasks(pids: Hierarchy, tops: Sequence[str]) -> bool:
    """True if ``pids.current`` (every task in the subtree, counted by the kernel) reads 0
    for each of ``tops``: then none of their directories' ``cgroup.procs`` need reading
    (at a shutdown the workers are gone already: 2000 reads saved at 1000 tenants)."""
    try:
        return all(int((pids.root / top / "pids.current").read_text().strip()) == 0 for top in tops)
    except (OSError, ValueError):
        return False


class Cgroup1Backend(fs.CgroupBackendBase):
    """Partitions as cgroup v1 directories mirrored in the memory/cpu/cpuacct/pids trees."""

    name: ClassVar[str] = "cgroup1"

    def __init__(
        self,
        root: str | None = None,
        *,
        instance: str | None = None,
        spawn_strategy: SpawnStrategy = "shim",
        sample_interval: float = 0.25,
        _mountinfo: str | None = None,
        _self_cgroup: str | None = None,
    ) -> None:
        super().__init__(sample_interval=sample_interval)
        self._by_ctrl = _discover(root, instance, _mountinfo, _self_cgroup)
        if "memory" not in self._by_ctrl:
            raise BackendUnavailable("no cgroup v1 memory hierarchy is mounted")
        # Distinct hierarchies, memory first (it is the one we read procs and OOMs from).
        seen: dict[Path, Hierarchy] = {}
        for c in CONTROLLERS:
            h = self._by_ctrl.get(c)
            if h is not None:
                seen.setdefault(h.mount.mountpoint, h)
        self._hier = list(seen.values())
        self.spawn_strategy: SpawnStrategy = spawn_strategy
        self._ncpu = os.cpu_count() or 1
        mem = self._by_ctrl["memory"].root
        self._memsw = (mem.parent / "memory.memsw.limit_in_bytes").exists()
        # Pressure thresholds being armed in the background, by partition (see _register).
        self._arming: dict[str, Future[None]] = {}
        self._arming_lock = threading.Lock()
        self._armer: ThreadPoolExecutor | None = None
        self._arms_pending = 0  # submitted to _armer and not done yet
        # The partitions with a directory in a cpuset-only hierarchy (our root always has one).
        self._cpusets: set[str] = set()

    # ------------------------------------------------------------------ discovery

    @classmethod
    def from_options(cls, options: BackendOptions) -> Cgroup1Backend:
        return cls(
            options.cgroup_root,
            instance=options.instance,
            sample_interval=options.sample_interval,
        )

    @classmethod
    def probe(cls, options: BackendOptions = BackendOptions()) -> str | None:  # noqa: B008, ARG003
        if os.geteuid() != 0 and not os.access("/proc/self/cgroup", os.R_OK):
            return "cannot read /proc/self/cgroup"
        try:
            hier = _discover(None, None, None, None)
        except BackendUnavailable as exc:
            return str(exc)
        mem = hier.get("memory")
        if mem is None:
            return "no cgroup v1 memory hierarchy is mounted (controller missing)"
        if mem.mount.read_only:
            return f"the cgroup v1 memory hierarchy at {mem.mount.mountpoint} is mounted read-only"
        parent = mem.root.parent
        if not os.access(parent, os.W_OK):
            who = "not root" if os.geteuid() != 0 else "not writable"
            return (
                f"cannot create cgroups in {parent} ({who}; run as root or delegate the "
                f"daemon's memory cgroup to its user)"
            )
        return None

    def enforcement(self) -> Mapping[Control, Enforcement]:
        k, s, n = Enforcement.KERNEL, Enforcement.SUPERVISED, Enforcement.NONE
        return {
            Control.MEMORY_MIN: n,
            Control.MEMORY_MAX: k,
            Control.MEMORY_RESERVED: s,
            Control.CPU_BUDGET: k if "cpu" in self._by_ctrl else n,
            Control.CPU_MAX: k if "cpu" in self._by_ctrl else n,
            Control.PIDS: k if "pids" in self._by_ctrl else n,
            Control.MEMORY_ISOLATION: k,
            Control.CONTAINER: n if container.unavailable() else k,
            Control.SECCOMP: n if seccomp.unavailable() else k,
            Control.CPUSET: k if "cpuset" in self._by_ctrl else n,
            # APS critical budgets have no Linux equivalent: said, not pretended.
            Control.CPU_CRITICAL: n,
        }

    def check(self, tree: PartitionTree) -> list[str]:
        problems = []
        for node in tree:
            why = fs.name_problem(node.name)
            if why:
                problems.append(f"partition '{node.path}': {why}")
        return problems

    def describe(self, tree: PartitionTree) -> dict[str, str]:
        return {node.path: " ".join(str(d) for d in self._dirs(node.path)) for node in tree}

    def lock_paths(self) -> list[Path]:
        return self.roots

    @property
    def roots(self) -> list[Path]:
        """Our root directory in every hierarchy used."""
        return [h.root for h in self._hier]

    def _dir(self, h: Hierarchy, path: str, leaf: str | None = None) -> Path:
        d = h.root / path if path else h.root
        return d / f"{fs.LEAF_PREFIX}{leaf}" if leaf is not None else d

    def _made_in(self, h: Hierarchy, path: str, leaf: str | None = None) -> bool:
        """Whether this backend makes the partition's (or leaf's) directory in ``h``: a
        leaf only where ``LEAF_CONTROLLERS`` are, a cpuset-only hierarchy's partition
        directory only where a cpuset is in force (``_cpusets``)."""
        if leaf is not None:
            return bool(h.controllers & LEAF_CONTROLLERS)
        return not path or not _cpuset_only(h) or path in self._cpusets

    def _dirs(self, path: str, leaf: str | None = None) -> list[Path]:
        """The directories this backend makes for a partition (or a worker leaf)."""
        return [self._dir(h, path, leaf) for h in self._hier if self._made_in(h, path, leaf)]

    def _any_dirs(self, path: str, leaf: str | None = None) -> list[Path]:
        """Its place in every hierarchy, made or not: what removal looks at, so that a
        directory an older layout made (a daemon before this one, adopted) goes too."""
        return [self._dir(h, path, leaf) for h in self._hier]

    def _join_dirs(self, path: str, leaf: str | None) -> list[tuple[Hierarchy, Path]]:
        """Where a worker of leaf ``leaf`` (or a process attached to the partition) is
        moved, at most one directory per hierarchy: its leaf; else its partition; in a
        cpuset-only hierarchy, the nearest partition on the way up with a cpuset
        directory, and none at all when no cpuset is in force there: it keeps the
        daemon's cpuset, the CPUs our root holds too (one move fewer per spawn)."""
        out = []
        for h in self._hier:
            if self._made_in(h, path, leaf):
                out.append((h, self._dir(h, path, leaf)))
                continue
            at = path
            while at and not self._made_in(h, at):
                at = at.rpartition("/")[0]
            if at or not _cpuset_only(h):
                out.append((h, self._dir(h, at)))
        return out

    def _cgroup_dirs(self, path: str, leaf: str | None = None) -> list[Path]:
        return self._dirs(path, leaf)

    def _mem(self, path: str, leaf: str | None = None) -> Path:
        return self._dir(self._by_ctrl["memory"], path, leaf)

    def _ctrl(self, controller: str, path: str) -> Path | None:
        h = self._by_ctrl.get(controller)
        return self._dir(h, path) if h is not None else None

    # ------------------------------------------------------------------ lifecycle

    def _ensure_root(self) -> None:
        with self._lock:
            if self._root_ready:
                return
            for h in self._hier:
                fs.mkdir(h.root, "")
                if "memory" in h.controllers:
                    self._use_hierarchy(h.root, "")
                if "cpuset" in h.controllers:
                    rtcg.init_cpuset_root(h.root)
            self._partitions.setdefault("", Partition(""))
            self._root_ready = True

    def _use_hierarchy(self, d: Path, partition: str) -> None:
        # Kernels >= 5.x always account hierarchically and only accept "1"; older ones
        # need it set before children exist. Either way "1" is what we want.
        try:
            fs.write_text(d / "memory.use_hierarchy", "1", partition)
        except BackendError:
            if fs.try_read_int(d / "memory.use_hierarchy") != 1:
                raise

    def reap_leftovers(self) -> list[str]:
        reaped: list[str] = []
        present = [h for h in self._hier if h.root.is_dir()]
        if not present:
            return reaped
        with self._lock:
            self._forget("")
        fs.kill_subtree(lambda: [d for h in present for d in fs.subtree_dirs(h.root)], "")
        for h in present:
            for d in fs.subtree_dirs(h.root):
                if d == h.root:
                    continue
                rel = str(d.relative_to(h.root))
                fs.rmdir_retry(d, rel)
                if rel not in reaped:
                    reaped.append(rel)
        return reaped

    def reap_leftovers_keeping(self, keep: Collection[tuple[str, str]]) -> list[str]:
        if not keep:
            return self.reap_leftovers()
        reaped: list[str] = []
        present = [h for h in self._hier if h.root.is_dir()]
        if not present:
            return reaped
        kept = {self._dir(h, p, leaf) for h in present for p, leaf in keep}
        # The kept leaves' ancestors stay too (they cannot be removed, and are re-made).
        spared = kept | {a for d in kept for a in d.parents}
        with self._lock:
            self._forget("")

        def reapable() -> list[Path]:
            return [d for h in present for d in fs.subtree_dirs(h.root) if d not in kept]

        # A kept worker has a leaf in the leaf hierarchies only: elsewhere it sits in its
        # partition's directory (or a cpuset above), which is reaped around it.
        keep_pids = {pid for d in kept for pid in fs.read_procs(d)}
        fs.kill_subtree(reapable, "", spare=keep_pids)
        for h in present:
            for d in fs.subtree_dirs(h.root):
                if d in spared:
                    continue
                rel = str(d.relative_to(h.root))
                fs.rmdir_retry(d, rel)
                if rel not in reaped:
                    reaped.append(rel)
        return reaped

    def create(self, partition: Partition) -> None:
        self._ensure_root()
        why = fs.name_problem(partition.name)
        if why:
            raise BackendError(f"partition '{partition.path}': {why}")
        p = partition.path
        with self._lock:
            self._note_cpuset(partition)
            for d in self._dirs(p):
                fs.mkdir(d, p)
            self._configure(partition)
            self._partitions[p] = partition
            self._register(p, None)

    def _note_cpuset(self, node: Partition) -> None:
        """Decide (at its creation: a reload does not rewrite a cpuset) whether ``node``
        gets a cpuset directory: if it sets one, or its parent has one (a child inherits
        its parent's CPUs: ``cgroup.clone_children``). Setting one under a parent that
        has none (a cpuset added to a live parent by a reload) makes the missing
        ancestors' directories first, each with its parent's CPUs."""
        h = self._by_ctrl.get("cpuset")
        if h is None or not _cpuset_only(h):
            return
        parent = node.path.rpartition("/")[0]
        if node.cpuset is None and parent not in self._cpusets:
            return
        chain = []
        at = node.path
        while at and at not in self._cpusets:
            chain.append(at)
            at = at.rpartition("/")[0]
        for path in reversed(chain[1:]):
            fs.mkdir(self._dir(h, path), path)
            self._cpusets.add(path)
        self._cpusets.add(node.path)

    def _configure(self, node: Partition) -> None:
        p = node.path
        mem = self._mem(p)
        self._use_hierarchy(mem, p)
        if node.memory_max is not None:
            limit = str(node.memory_max)
            fs.write_text(mem / "memory.limit_in_bytes", limit, p)
            if self._memsw:
                fs.write_text(mem / "memory.memsw.limit_in_bytes", limit, p)
            elif (mem / "memory.swappiness").exists():
                fs.write_text(mem / "memory.swappiness", "0", p)
            threshold = node.pressure_threshold
            assert threshold is not None
            fs.write_text(mem / "memory.soft_limit_in_bytes", str(threshold), p)
        cpu = self._ctrl("cpu", p)
        if cpu is not None:
            shares = shares_for(node.cpu_budget)
            if shares is not None:
                fs.write_text(cpu / "cpu.shares", str(shares), p)
            quota = fs.quota_for(node.cpu_max, self._ncpu)
            if quota is not None:
                fs.write_text(cpu / "cpu.cfs_period_us", str(fs.CFS_PERIOD_US), p)
                fs.write_text(cpu / "cpu.cfs_quota_us", str(quota), p)
        pids = self._ctrl("pids", p)
        if pids is not None and node.pids_max is not None:
            fs.write_text(pids / "pids.max", str(node.pids_max), p)
        cpuset = self._ctrl("cpuset", p)
        if cpuset is not None and node.cpuset is not None:
            rtcg.write_cpuset(cpuset, node)
        if cpu is not None and node.rt_runtime_us:
            root = self._by_ctrl["cpu"].root
            rtcg.write_rt_runtime(cpu, root, node)

    def _limit_writes(self, old: Partition, new: Partition) -> list[tuple[Path, str]]:
        # Memory last: it is the write the kernel may refuse (EBUSY), and the others are
        # then put back by write_all.
        p, mem, writes = new.path, self._mem(new.path), []
        cpu = self._ctrl("cpu", p)
        if cpu is not None and old.cpu_budget != new.cpu_budget:
            writes.append((cpu / "cpu.shares", str(shares_for(new.cpu_budget) or 1024)))
        if cpu is not None and old.cpu_max != new.cpu_max:
            quota = fs.quota_for(new.cpu_max, self._ncpu)
            if quota is not None:
                writes.append((cpu / "cpu.cfs_period_us", str(fs.CFS_PERIOD_US)))
            writes.append((cpu / "cpu.cfs_quota_us", str(quota) if quota is not None else "-1"))
        pids = self._ctrl("pids", p)
        if pids is not None and old.pids_max != new.pids_max:
            value = str(new.pids_max) if new.pids_max is not None else "max"
            writes.append((pids / "pids.max", value))
        if old.pressure_threshold != new.pressure_threshold:
            threshold = new.pressure_threshold
            soft = str(threshold) if threshold is not None else "-1"
            writes.append((mem / "memory.soft_limit_in_bytes", soft))
        if old.memory_max != new.memory_max:
            limit = str(new.memory_max) if new.memory_max is not None else "-1"
            pair = [(mem / "memory.limit_in_bytes", limit)]
            if self._memsw:
                # The kernel keeps limit_in_bytes <= memsw.limit_in_bytes at every write:
                # raise the memory+swap cap first, lower it last.
                swap = (mem / "memory.memsw.limit_in_bytes", limit)
                growing = new.memory_max is None or (
                    old.memory_max is not None and new.memory_max > old.memory_max
                )
                pair = [swap, *pair] if growing else [*pair, swap]
            writes += pair
        return writes

    def _rearm_pressure(self, path: str) -> None:
        # The eventfd threshold is fixed when registered: replace it.
        self._armed(lambda p: p == path, check=False)
        self._notifier.remove(lambda k: k == ("pressure", path, None))
        self._pressure_state.pop(path, None)
        threshold = self._partitions[path].pressure_threshold
        if threshold is not None:
            self._pressure_state[path] = 0
            self._event(("pressure", path, None), self._mem(path), "memory.usage_in_bytes",
                        f" {threshold}")  # fmt: skip

    def destroy(self, path: str) -> None:
        if not path:
            raise BackendError("destroy('') would remove the root; destroy its children")
        tops = self._any_dirs(path)
        with self._lock:
            self._forget(path)
        # Kills and rmdir outside the lock (see CgroupBackendBase.release_leaf).
        fs.kill_subtree(lambda: [d for t in tops for d in fs.subtree_dirs(t)], path)
        self._remove_subtree(tops, path)

    def destroy_all(self, paths: Collection[str]) -> list[tuple[str, Exception]]:
        """All of ``paths`` in one pass (the daemon's shutdown): the bookkeeping of each
        outermost partition forgotten once, every directory below them listed once, every
        process in them killed in one loop, then every directory removed, deepest first.

        One ``destroy`` per partition, 8 at a time, listed each subtree three times (the
        kill loop's two reads and the removal), and each directory listing of a memory
        cgroup is some 30 entries: at 100 tenants that was 0.2 s of a shutdown, most of
        the partitions' removal (issue 14)."""
        paths = [p for p in paths if p]
        outermost = [p for p in paths if not any(q != p and fs.under(p, q) for q in paths)]
        with self._lock:
            made = self._made_below(outermost)
            for top_path in outermost:
                self._forget(top_path)
        if self._destroy_made(outermost, made):
            return []
        # What the quick pass left (anything it did not expect), the thorough way.
        where: dict[Path, str] = {}
        for top_path in outermost:
            for top in self._any_dirs(top_path):
                for d in fs.subtree_dirs(top):  # deepest first within each subtree
                    where.setdefault(d, top_path)
        failures: list[tuple[str, Exception]] = []
        try:
            fs.kill_subtree(lambda: where, ", ".join(outermost))
        except BackendError as exc:
            return [(p, exc) for p in outermost]  # processes left: no rmdir can succeed
        failed: set[str] = set()
        for d in sorted(where, key=lambda d: len(d.parts), reverse=True):
            if where[d] in failed:
                continue
            try:
                fs.rmdir_retry(d, where[d])
            except BackendError as exc:
                failed.add(where[d])
                failures.append((where[d], exc))
        return failures

    def _made_below(self, tops: Sequence[str]) -> list[Path]:
        """Every directory the bookkeeping says this backend made for the partitions and
        leaves under ``tops``, deepest first. Under the lock."""
        made: list[Path] = []
        for p in self._partitions:
            if p and any(fs.under(p, t) for t in tops):
                made += self._dirs(p)
        for p, leaf in self._leaves:
            if any(fs.under(p, t) for t in tops):
                made += self._dirs(p, leaf)
        made.sort(key=lambda d: len(d.parts), reverse=True)
        return made

    def _destroy_made(self, outermost: Sequence[str], made: Sequence[Path]) -> bool:
        """``destroy_all``'s quick pass: True if it removed everything. The directories
        come from the bookkeeping (``_made_below``), not from listing the hierarchies
        (os.walk of 2000 directories was most of this pass at 1000 tenants, and each
        memory cgroup lists some 30 files), and no ``cgroup.procs`` is read when
        ``pids.current`` says the subtrees are empty (at a shutdown the workers are gone
        already). The first ``rmdir`` that fails (a directory the bookkeeping does not
        know: a tenant's own sub-cgroup, an older daemon's layout; a process that left
        its leaf; a cgroup the kernel still calls busy) ends it: the thorough pass then
        lists and removes whatever is left, with retries, as does a top directory still
        there in any hierarchy."""
        if not self._hier:
            return True
        pids = self._by_ctrl.get("pids")
        try:
            if pids is None or not _no_tasks(pids, outermost):
                fs.kill_subtree(lambda: made, ", ".join(outermost))
            for d in made:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(d)
        except (OSError, BackendError):
            return False
        return not any(d.exists() for p in outermost for d in self._any_dirs(p))

    def _remove_subtree(self, tops: Sequence[Path], path: str) -> None:
        for top in tops:
            for d in fs.subtree_dirs(top):
                fs.rmdir_retry(d, path)

    def _remove_dirs(self, path: str, leaf: str | None) -> list[str]:
        tops = self._any_dirs(path, leaf)
        fs.kill_subtree(lambda: [d for t in tops for d in fs.subtree_dirs(t)], path)
        self._remove_subtree(tops, path)
        return [str(t) for t in tops]

    def _forget(self, top: str) -> None:
        self._armed(lambda p: fs.under(p, top), check=False)
        super()._forget(top)
        self._cpusets = {p for p in self._cpusets if not fs.under(p, top)}

    def ensure_leaf(self, path: str, leaf: str) -> None:
        # No process runs in a partition before its pressure threshold is armed.
        self._armed(lambda p: p == path, check=True)
        super().ensure_leaf(path, leaf)

    def close(self) -> None:
        self._armed(lambda _p: True, check=False)
        if self._armer is not None:
            self._armer.shutdown()
        super().close()
        # RAII for the root: remove it if the daemon destroyed everything below.
        for h in self._hier:
            try:
                os.rmdir(h.root)
            except OSError:
                pass

    # ------------------------------------------------------------------ processes

    def _make_leaf_dirs(self, path: str, leaf: str) -> None:
        for d in self._dirs(path, leaf):
            fs.mkdir(d, f"{path}/{fs.LEAF_PREFIX}{leaf}")
        node = self._partitions.get(path)
        cpu = self._by_ctrl.get("cpu")
        if node is not None and cpu is not None and node.rt_leaf_runtime_us:
            rtcg.write_leaf_rt_runtime(self._dir(cpu, path, leaf), node)

    def spawn(self, request: SpawnRequest) -> subprocess.Popen[bytes]:
        path, leaf = request.partition, request.leaf
        self.ensure_leaf(path, leaf)
        joins = self._join_dirs(path, leaf)
        dirs = [d for _, d in joins]
        kwargs = request.popen_kwargs()
        argv = self.exec_argv(request)
        if self.spawn_strategy == "thread":
            return self._spawn_moved_thread(joins, argv, kwargs, path)
        procs = [str(d / "cgroup.procs") for d in dirs]
        if self.spawn_strategy == "preexec":
            # Measured alternative only (bench/bench_spawn.py); see the module docstring.
            return subprocess.Popen(argv, preexec_fn=fs.preexec_attach(procs), **kwargs)
        # The shim moves its one thread through `tasks` (no global lock: fs.JOIN_SHIM).
        return fs.spawn_shim(argv, [str(d / "tasks") for d in dirs], kwargs)

    def attach_plan(self, request: SpawnRequest) -> AttachPlan:
        self.ensure_leaf(request.partition, request.leaf)
        joins = self._join_dirs(request.partition, request.leaf)
        return AttachPlan(procs=tuple(str(d / "cgroup.procs") for _, d in joins))

    def _spawn_moved_thread(
        self,
        joins: list[tuple[Hierarchy, Path]],
        argv: list[str],
        kwargs: dict[str, Any],
        path: str,
    ) -> subprocess.Popen[bytes]:
        tid = threading.get_native_id()
        home = self._thread_home()
        moved: list[Hierarchy] = []
        try:
            for h, d in joins:
                fs.write_text(d / "tasks", str(tid), path)
                moved.append(h)
            return subprocess.Popen(argv, **kwargs)
        finally:
            # Always go home, even if Popen raised: a daemon thread left in a leaf would
            # keep the leaf busy (rmdir EBUSY) and be charged CPU to the tenant.
            for h in moved:
                fs.write_text(home[h.mount.mountpoint] / "tasks", str(tid), "")

    def _thread_home(self) -> dict[Path, Path]:
        """This thread's current cgroup directory in every hierarchy we use."""
        with open(f"/proc/self/task/{threading.get_native_id()}/cgroup") as f:
            return self._placement_of(f.read())

    def _placement_of(self, proc_cgroup: str) -> dict[Path, Path]:
        """Mount point -> cgroup directory, per hierarchy we use, from a /proc/*/cgroup text."""
        mine = fs.own_cgroups(proc_cgroup)
        out = {}
        for h in self._hier:
            c = next(iter(h.controllers))
            rel = fs.relative_to_mount(mine.get(c, "/"), h.mount)
            out[h.mount.mountpoint] = h.mount.mountpoint / rel.lstrip("/")
        return out

    def attach(self, path: str, pid: int) -> dict[str, str]:
        if path not in self._partitions:
            raise BackendError(f"partition '{path}' was not created by this backend")
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                before = self._placement_of(f.read())
        except FileNotFoundError:
            raise ProcessLookupError(f"no process {pid}") from None
        for _, d in self._join_dirs(path, None):
            fs.write_text(d / "cgroup.procs", str(pid), path)
        return {str(mount): str(d) for mount, d in before.items()}

    def detach(self, pid: int, previous: Any = None) -> None:
        # Back where attach found it, hierarchy by hierarchy; to the daemon's own cgroup
        # where that is gone, unknown, or inside our root (it will be removed).
        home = self._thread_home()
        recorded = previous if isinstance(previous, dict) else {}
        for h in self._hier:
            mount = h.mount.mountpoint
            target = Path(recorded.get(str(mount), home[mount]))
            if target == h.root or h.root in target.parents or not target.is_dir():
                target = home[mount]
            try:
                fs.write_text(target / "cgroup.procs", str(pid), "")
            except BackendError:
                if target == home[mount]:
                    raise
                fs.write_text(home[mount] / "cgroup.procs", str(pid), "")

    def pids(self, path: str, leaf: str | None = None) -> list[int]:
        return fs.subtree_procs(self._mem(path, leaf))

    # ------------------------------------------------------------------ figures

    def _oom_count(self, path: str, leaf: str | None) -> int:
        # v1 counts an OOM kill only in the victim's own memcg (not its ancestors).
        counters = fs.read_keyed(self._mem(path, leaf) / "memory.oom_control")
        if "oom_kill" not in counters:
            raise BackendError(
                f"partition '{path}': no oom_kill line in "
                f"{self._mem(path, leaf) / 'memory.oom_control'}"
            )
        return counters["oom_kill"]

    def _register(self, path: str, leaf: str | None) -> None:
        mem = self._mem(path, leaf)
        self._event(("oom", path, leaf), mem, "memory.oom_control", "")
        node = self._partitions.get(path)
        if leaf is None and node is not None and node.pressure_threshold is not None:
            self._pressure_state[path] = 0
            self._arm_pressure(path, mem, node.pressure_threshold)
        self._note_registered(path, leaf)

    # Arming a threshold on memory.usage_in_bytes makes the kernel wait for an RCU grace
    # period (synchronize_rcu when it swaps the thresholds array): 15 ms per partition
    # here, 1.3 s of a 100-tenant daemon's start when done one after another, while an
    # OOM registration takes 0.03 ms. Waits running at the same time share grace periods
    # (20 threads: 0.65 ms each), so thresholds are armed by a small pool in the
    # background, and every use of a partition that needs its threshold armed (its first
    # leaf, i.e. before any process runs in it; re-arming; removal) waits for it first.
    ARMING_THREADS = 16

    def _arm_pressure(self, path: str, mem: Path, threshold: int) -> None:
        with self._arming_lock:
            if self._armer is None:
                self._armer = ThreadPoolExecutor(self.ARMING_THREADS, "cgroup1-pressure")
            self._arms_pending += 1
            key: fs.Key = ("pressure", path, None)
            future = self._arming[path] = self._armer.submit(
                self._event, key, mem, "memory.usage_in_bytes", f" {threshold}"
            )
        # Outside the lock: a future already done calls back at once, in this thread.
        future.add_done_callback(lambda done: self._armed_well(path, done))

    def _armed_well(self, path: str, done: Future[None]) -> None:
        """A threshold armed without error has nothing left to tell: its future (a lock,
        a condition and their waiters' lists) is dropped instead of being kept until the
        partition's first leaf, which a tenant never started never makes (issue 14: the
        daemon's memory per configured tenant). One that failed stays, for ``_armed``."""
        retired = None
        with self._arming_lock:
            if not done.cancelled() and done.exception() is None and self._arming.get(path) is done:
                del self._arming[path]
            self._arms_pending -= 1
            if self._arms_pending == 0:
                # The burst is armed: the pool's threads go (a stack and a malloc arena
                # each, kept for the daemon's life otherwise: issue 14, daemon RSS); the
                # next threshold to arm starts a new pool.
                retired, self._armer = self._armer, None
        if retired is not None:
            retired.shutdown(wait=False)  # may be one of its own threads: no join

    def _armed(self, match: Callable[[str], bool], *, check: bool) -> None:
        """Wait until the thresholds of the partitions ``match`` selects are armed; with
        ``check``, raise what arming one of them raised (once)."""
        with self._arming_lock:
            paths = [p for p in self._arming if match(p)]
            pending = [self._arming.pop(p) for p in paths]
        for future in pending:
            exc = future.exception()
            if exc is not None and check:
                raise exc

    def _event(self, key: fs.Key, mem: Path, control: str, args: str) -> None:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            cfd = os.open(mem / control, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fs.write_text(mem / "cgroup.event_control", f"{efd} {cfd}{args}", key[1])
            finally:
                # The kernel holds its own references now; the control fd can go.
                os.close(cfd)
        except BaseException:
            os.close(efd)
            raise
        self._notifier.add(key, efd, eventfd=True)

    def _pressure_check(self, path: str) -> dict[str, object] | None:
        node = self._partitions[path]
        threshold = node.pressure_threshold
        usage = fs.read_int(self._mem(path) / "memory.usage_in_bytes", path)
        # The threshold eventfd fires on crossings in both directions: report upward
        # crossings once, re-arm on the way down.
        above = int(threshold is not None and usage >= threshold)
        was = self._pressure_state.get(path, 0)
        self._pressure_state[path] = above
        if above and not was:
            return {"usage": usage, "threshold": threshold, "max": node.memory_max}
        return None

    def stats(self, path: str) -> PartitionStats:
        mem = self._mem(path)
        limit = fs.try_read_int(mem / "memory.limit_in_bytes")
        cpuacct = self._ctrl("cpuacct", path)
        cpu = self._ctrl("cpu", path)
        pids = self._ctrl("pids", path)
        ooms = sum(n for p, n in self._retired_ooms.items() if fs.under(p, path))
        for d in fs.subtree_dirs(mem):
            ooms += fs.read_keyed(d / "memory.oom_control").get("oom_kill", 0)
        throttled = fs.read_keyed(cpu / "cpu.stat").get("throttled_time") if cpu else None
        return PartitionStats(
            memory_current=fs.read_int(mem / "memory.usage_in_bytes", path),
            memory_peak=fs.try_read_int(mem / "memory.max_usage_in_bytes"),
            memory_limit=limit if limit is not None and limit < fs.UNLIMITED_V1 else None,
            memory_pressure_events=self._pressure_events.get(path, 0),
            oom_kills=ooms,
            cpu_usage_ns=fs.try_read_int(cpuacct / "cpuacct.usage") if cpuacct else None,
            cpu_throttled_ns=throttled,
            pids_current=fs.try_read_int(pids / "pids.current") if pids else None,
            pids=fs.subtree_procs(mem),
        )
