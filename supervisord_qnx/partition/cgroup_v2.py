"""The cgroup2 backend: the partition tree maps 1:1 onto a subtree of the unified hierarchy.

Layout
======

Our root is ``<the daemon's own cgroup>/supervisord-qnx`` (``daemon.cgroup_root`` renames
it, or gives an absolute path from the mount), which is exactly what systemd's
``Delegate=yes`` hands a service: the service's cgroup and everything below it. A
partition ``a/b`` is ``<root>/a/b``; a worker leaf ``web-0`` is ``<root>/tenants/web/@web-0``.

The no-internal-processes rule says a cgroup that enables domain controllers for its
children (``cgroup.subtree_control``) holds no processes itself. So:

* processes live only in leaves: every worker instance gets its own leaf, and a process
  attached with ``attach(path, pid)`` goes to the partition's ``@attached`` leaf;
* controllers are enabled top-down - every ancestor of our root up to the mount, then the
  root, then each partition before its children exist;
* the daemon's own cgroup normally holds the daemon, which would make the first step fail
  with ``EBUSY``. With ``move_self`` (default) the daemon moves itself into a sibling leaf
  ``<root>.daemon`` first - what systemd's ``DelegateSubgroup=`` does - but only when it is
  the only process there; anything else is someone else's and we stop with the reason.

Settings
========

=================  ===============================================  ==========
control            files                                            enforced
=================  ===============================================  ==========
memory.min         ``memory.min`` (protected from reclaim)          kernel
memory.reserved    ``memory.high`` = max - reserved (throttles and  kernel
                   reclaims above it; ``high`` counts pressure)
memory.max         ``memory.max`` and ``memory.swap.max = 0``       kernel
                   (so max caps RAM *and* swap); ``memory.oom.group
                   = 1`` on worker leaves (an OOM kill takes the
                   whole worker, never half of it)
cpu.budget         ``cpu.weight`` = budget% x 100 (1 % = default)   kernel
cpu.max            ``cpu.max`` = "max% x ncpu x period period"      kernel
pids               ``pids.max``                                     kernel
memory-isolation   separate processes, MMU-separated                kernel
container          no namespaces here                               none
=================  ===============================================  ==========

``cpu.weight`` (1..10000, default 100) is proportional among siblings: the same factor for
every budget keeps the budgets' ratios, idle CPU is lent to whoever runs, and a partition
without a budget keeps the default weight 100 - the weight of a 1 % budget. ``cpu.max`` is
a ceiling over all CPUs: 100 % of a machine with N CPUs is ``N x period`` of quota.

Attach before exec
==================

A domain cgroup has no thread granularity (``cgroup.threads`` only moves threads inside a
threaded subtree), so the v1 trick of moving the spawning thread is not available. We use
the shell shim (``/bin/sh -c 'echo $$ > leaf/cgroup.procs; exec "$@"'``): ``subprocess``
keeps its vfork fast path, the shell moves itself and execs the worker under the same pid,
so the worker's first instruction runs in the leaf. ``preexec`` is available for
comparison (see ``bench/bench_spawn.py``). ``clone3(CLONE_INTO_CGROUP)`` would be ideal but
``subprocess`` does not expose it, and calling ``clone3`` from Python through ``ctypes``
leaves the child running Python after a raw clone - not safe in a threaded daemon.

Events
======

``memory.events`` of each leaf (``oom_kill``) and each partition (``high``) is opened and
registered for ``EPOLLPRI`` in the shared epoll set (see ``cgroupfs``); the kernel marks the
file modified on every counter change. On a tmpfs laid out like cgroupfs (tests) the fds
cannot be epolled and the counters are sampled instead.

Without the memory controller
=============================

``probe`` (and so ``backend = "auto"``) never picks cgroup2 without a memory controller.
Constructed directly over such a mount (``mount=``: a hybrid layout's
``/sys/fs/cgroup/unified``, where the tests prove the cgroup2 core for real), the
backend still does everything the core offers - leaves, moves, ``cgroup.kill``,
teardown - and declares the memory controls ``none`` in ``enforcement``; a partition
that asks for a memory limit fails on the missing ``memory.*`` file, naming it. A leaf
gets ``memory.oom.group`` and an OOM watch only where its ``cgroup.controllers`` lists
memory.
"""

from __future__ import annotations

import errno
import os
import select
import subprocess
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import ClassVar, Literal

import trio

from supervisord_qnx.partition import cgroupfs as fs
from supervisord_qnx.partition import container, seccomp
from supervisord_qnx.partition.backend import (
    KILL_LEAF_TIMEOUT,
    AttachPlan,
    BackendError,
    BackendOptions,
    BackendUnavailable,
    Control,
    Enforcement,
    PartitionStats,
    SpawnRequest,
)
from supervisord_qnx.partition.realtime import format_cpulist
from supervisord_qnx.partition.tree import Partition, PartitionTree
from supervisord_qnx.units import format_size

WANTED = ("memory", "cpu", "pids")
ATTACHED_LEAF = "attached"
PRESSURE_MIN_INTERVAL = 1.0  # at most one pressure event per partition per second


def weight_for(budget: float | None) -> int | None:
    """``cpu.weight`` for a budget in percent of the machine (1 % ↔ the default 100)."""
    if budget is None:
        return None
    return max(1, min(10_000, round(budget * 100)))


def cpu_max_for(cpu_max: float | None, ncpu: int, period: int = fs.CFS_PERIOD_US) -> str | None:
    """``cpu.max`` ("quota period"): the same CFS quota as cgroup v1's ``cfs_quota_us``."""
    quota = fs.quota_for(cpu_max, ncpu, period)
    return None if quota is None else f"{quota} {period}"


def _find_mount(mountinfo: str | None) -> fs.Mount | None:
    return next((m for m in fs.cgroup_mounts(mountinfo) if m.fstype == "cgroup2"), None)


def _tokens(path: Path) -> set[str]:
    try:
        return {t.lstrip("+") for t in path.read_text().split()}
    except OSError:
        return set()


def _has_memory(d: Path) -> bool:
    """Does cgroup ``d`` have the memory controller (its parent enabled it for it)?"""
    return "memory" in _tokens(d / "cgroup.controllers")


class Cgroup2Backend(fs.CgroupBackendBase):
    """Partitions as a cgroup2 subtree under the daemon's own (delegated) cgroup."""

    name: ClassVar[str] = "cgroup2"

    def __init__(
        self,
        root: str | None = None,
        *,
        instance: str | None = None,
        mount: str | Path | None = None,
        own_cgroup: str | None = None,
        spawn_strategy: Literal["shim", "preexec"] = "shim",
        move_self: bool = True,
        sample_interval: float = 0.25,
        ncpu: int | None = None,
    ) -> None:
        super().__init__(sample_interval=sample_interval)
        if mount is None:
            found = _find_mount(None)
            if found is None:
                raise BackendUnavailable("no cgroup2 hierarchy is mounted")
            self.mount = found.mountpoint
            own = own_cgroup or fs.relative_to_mount(fs.own_cgroups().get("", "/"), found)
        else:
            self.mount = Path(mount)
            own = own_cgroup or "/"
        self.own = own
        self.own_dir = self.mount / own.lstrip("/")
        self.root = fs.root_dir(self.mount, own, root, instance)
        self.spawn_strategy = spawn_strategy
        self._move_self = move_self
        self._ncpu = ncpu or os.cpu_count() or 1
        self._controllers: set[str] = set()
        self._last_pressure: dict[str, float] = {}

    # ------------------------------------------------------------------ discovery

    @classmethod
    def from_options(cls, options: BackendOptions) -> Cgroup2Backend:
        return cls(
            options.cgroup_root,
            instance=options.instance,
            sample_interval=options.sample_interval,
        )

    @classmethod
    def probe(cls, options: BackendOptions = BackendOptions()) -> str | None:  # noqa: B008
        mount = _find_mount(None)
        if mount is None:
            return "no cgroup2 hierarchy is mounted"
        if mount.read_only:
            return f"the cgroup2 hierarchy at {mount.mountpoint} is mounted read-only"
        own = fs.relative_to_mount(fs.own_cgroups().get("", "/"), mount)
        own_dir = mount.mountpoint / own.lstrip("/")
        available = _tokens(own_dir / "cgroup.controllers")
        if "memory" not in available:
            return (
                f"the cgroup2 memory controller is missing: {own_dir}/cgroup.controllers "
                f"offers {' '.join(sorted(available)) or 'nothing'} (on a hybrid layout the "
                f"v1 hierarchy holds memory; under systemd set Delegate=yes)"
            )
        control = own_dir / "cgroup.subtree_control"
        if not os.access(own_dir, os.W_OK) or not os.access(control, os.W_OK):
            who = "not root" if os.geteuid() != 0 else "read-only"
            return f"the daemon's cgroup {own_dir} is not delegated to us ({who}: {control})"
        try:
            fs.root_dir(mount.mountpoint, own, options.cgroup_root, options.instance)
        except BackendUnavailable as exc:
            return str(exc)
        return None

    def enforcement(self) -> Mapping[Control, Enforcement]:
        k, n = Enforcement.KERNEL, Enforcement.NONE
        avail = _tokens(self.own_dir / "cgroup.controllers") | self._controllers
        memory = k if "memory" in avail else n
        return {
            Control.MEMORY_MIN: memory,
            Control.MEMORY_MAX: memory,
            Control.MEMORY_RESERVED: memory,
            Control.CPU_BUDGET: k if "cpu" in avail else n,
            Control.CPU_MAX: k if "cpu" in avail else n,
            Control.PIDS: k if "pids" in avail else n,
            Control.MEMORY_ISOLATION: k,
            Control.CONTAINER: n if container.unavailable() else k,
            Control.SECCOMP: n if seccomp.unavailable() else k,
            Control.CPUSET: k if "cpuset" in avail else n,
            # APS critical budgets have no Linux equivalent: said, not pretended.
            Control.CPU_CRITICAL: n,
        }

    def check(self, tree: PartitionTree) -> list[str]:
        return [
            f"partition '{node.path}': {why}"
            for node in tree
            if (why := fs.name_problem(node.name)) is not None
        ]

    def describe(self, tree: PartitionTree) -> dict[str, str]:
        return {node.path: str(self._dir(node.path)) for node in tree}

    @property
    def roots(self) -> list[Path]:
        return [self.root]

    def lock_paths(self) -> list[Path]:
        return self.roots

    def _cgroup_dirs(self, path: str, leaf: str | None = None) -> list[Path]:
        return [self._dir(path, leaf)]

    def _dir(self, path: str, leaf: str | None = None) -> Path:
        d = self.root / path if path else self.root
        return d / f"{fs.LEAF_PREFIX}{leaf}" if leaf is not None else d

    # ------------------------------------------------------------------ lifecycle

    def _mkdir(self, path: Path, partition: str) -> bool:
        """Create one cgroup directory (a seam: file-level tests emulate the kernel here)."""
        return fs.mkdir(path, partition)

    def _rmdir(self, path: Path, partition: str) -> None:
        """Remove one empty cgroup directory (a seam, like ``_mkdir``)."""
        fs.rmdir_retry(path, partition)

    def _enable(self, d: Path, partition: str) -> None:
        """Enable our controllers for ``d``'s children, if ``d`` offers them."""
        offered = _tokens(d / "cgroup.controllers")
        wanted = [c for c in WANTED if c in offered]
        missing = [c for c in wanted if c not in _tokens(d / "cgroup.subtree_control")]
        self._controllers.update(c for c in wanted if c not in missing)
        if not missing:
            return
        value = " ".join(f"+{c}" for c in missing)
        try:
            fs.write_text(d / "cgroup.subtree_control", value, partition)
        except BackendError as exc:
            cause = exc.__cause__
            busy = isinstance(cause, OSError) and cause.errno == errno.EBUSY
            if not (busy and self._move_self and d == self.own_dir):
                raise
            self._evacuate_self()
            fs.write_text(d / "cgroup.subtree_control", value, partition)
        self._controllers.update(wanted)

    def _enable_cpuset(self, d: Path, partition: str) -> None:
        """``+cpuset`` in ``d``'s and each ancestor's ``cgroup.subtree_control``, top-down
        from the mount (an empty ``cpuset.cpus`` below means "the parent's CPUs")."""
        chain = [d, *d.parents]
        chain = [x for x in chain if x == self.mount or self.mount in x.parents]
        for x in reversed(chain):
            if "cpuset" in _tokens(x / "cgroup.subtree_control"):
                continue
            if "cpuset" not in _tokens(x / "cgroup.controllers"):
                raise BackendError(
                    f"partition '{partition}': the cpuset controller is not offered in "
                    f"{x / 'cgroup.controllers'}"
                )
            fs.write_text(x / "cgroup.subtree_control", "+cpuset", partition)
        self._controllers.add("cpuset")

    def _evacuate_self(self) -> None:
        """Move the daemon out of its own cgroup into ``<root>.daemon`` (see module doc)."""
        others = [p for p in fs.read_procs(self.own_dir) if p != os.getpid()]
        if others:
            raise BackendError(
                f"the cgroup root: {self.own_dir} holds processes {others[:8]} besides the "
                f"daemon, so controllers cannot be enabled for its children "
                f"(no-internal-processes); run the daemon in a cgroup of its own "
                f"(systemd Delegate=yes) or set daemon.cgroup_root to a delegated cgroup"
            )
        home = self.root.with_name(self.root.name + ".daemon")
        self._mkdir(home, "")
        fs.write_text(home / "cgroup.procs", str(os.getpid()), "")

    def _ensure_root(self) -> None:
        with self._lock:
            if self._root_ready:
                return
            chain = [self.root.parent, *self.root.parent.parents]
            chain = [d for d in chain if d == self.mount or self.mount in d.parents]
            for d in reversed(chain):  # top-down, from the mount to the root's parent
                self._enable(d, "")
            self._mkdir(self.root, "")
            self._enable(self.root, "")
            self._partitions.setdefault("", Partition(""))
            self._root_ready = True

    def reap_leftovers(self) -> list[str]:
        if not self.root.is_dir():
            return []
        with self._lock:
            self._forget("")
        # Kills and rmdir outside the lock (see CgroupBackendBase.release_leaf).
        self._kill(self.root, "")
        reaped = []
        for d in fs.subtree_dirs(self.root):
            if d != self.root:
                rel = str(d.relative_to(self.root))
                self._rmdir(d, rel)
                reaped.append(rel)
        return reaped

    def reap_leftovers_keeping(self, keep: Collection[tuple[str, str]]) -> list[str]:
        if not keep or not self.root.is_dir():
            return self.reap_leftovers()
        kept = {self._dir(p, leaf) for p, leaf in keep}
        spared = kept | {a for d in kept for a in d.parents}
        with self._lock:
            self._forget("")
        # No cgroup.kill here: it would take the kept leaves with their ancestors.
        fs.kill_subtree(lambda: [d for d in fs.subtree_dirs(self.root) if d not in kept], "")
        reaped = []
        for d in fs.subtree_dirs(self.root):
            if d not in spared:
                rel = str(d.relative_to(self.root))
                self._rmdir(d, rel)
                reaped.append(rel)
        return reaped

    def _kill(self, top: Path, partition: str) -> None:
        # cgroup.kill (5.14+) kills the subtree atomically, forks included; the loop
        # covers older kernels and confirms that cgroup.procs is empty everywhere.
        kill = top / "cgroup.kill"
        if kill.exists() and any(fs.read_procs(d) for d in fs.subtree_dirs(top)):
            fs.write_text(kill, "1", partition)
        fs.kill_subtree(lambda: fs.subtree_dirs(top), partition)

    def create(self, partition: Partition) -> None:
        self._ensure_root()
        p = partition.path
        why = fs.name_problem(partition.name)
        if why:
            raise BackendError(f"partition '{p}': {why}")
        with self._lock:
            d = self._dir(p)
            if partition.effective_cpuset is not None:
                # Only where a cpuset is asked for (docs/realtime.md): from the mount down
                # to this partition, so its cpuset.cpus exists and its leaves inherit it.
                self._enable_cpuset(d.parent, p)
            self._mkdir(d, p)
            self._configure(d, partition)
            # A partition holds no processes itself (they live in leaves), so it may
            # enable controllers for its children.
            self._enable(d, p)
            self._partitions[p] = partition
            self._register(p, None)

    def _configure(self, d: Path, node: Partition) -> None:
        p = node.path
        if node.memory_min:
            fs.write_text(d / "memory.min", str(node.memory_min), p)
        if node.memory_max is not None:
            fs.write_text(d / "memory.max", str(node.memory_max), p)
            fs.write_text(d / "memory.high", str(node.pressure_threshold), p)
            if (d / "memory.swap.max").exists():
                fs.write_text(d / "memory.swap.max", "0", p)
        weight = weight_for(node.cpu_budget)
        if weight is not None:
            fs.write_text(d / "cpu.weight", str(weight), p)
        quota = cpu_max_for(node.cpu_max, self._ncpu)
        if quota is not None:
            fs.write_text(d / "cpu.max", quota, p)
        if node.pids_max is not None:
            fs.write_text(d / "pids.max", str(node.pids_max), p)
        if node.cpuset is not None:
            fs.write_text(d / "cpuset.cpus", format_cpulist(node.cpuset), p)
        if node.effective_cpuset is not None:
            self._enable_cpuset(d, p)

    def _limit_writes(self, old: Partition, new: Partition) -> list[tuple[Path, str]]:
        d, writes = self._dir(new.path), []
        if old.cpu_budget != new.cpu_budget:
            writes.append((d / "cpu.weight", str(weight_for(new.cpu_budget) or 100)))
        if old.cpu_max != new.cpu_max:
            writes.append((d / "cpu.max", cpu_max_for(new.cpu_max, self._ncpu) or "max"))
        if old.pids_max != new.pids_max:
            value = str(new.pids_max) if new.pids_max is not None else "max"
            writes.append((d / "pids.max", value))
        if old.memory_min != new.memory_min:
            writes.append((d / "memory.min", str(new.memory_min)))
        if old.pressure_threshold != new.pressure_threshold:
            high = new.pressure_threshold
            writes.append((d / "memory.high", str(high) if high is not None else "max"))
        if old.memory_max != new.memory_max:
            cap = new.memory_max
            writes.append((d / "memory.max", str(cap) if cap is not None else "max"))
            if old.memory_max is None and (d / "memory.swap.max").exists():
                writes.append((d / "memory.swap.max", "0"))
        return writes

    def _before_limits(self, old: Partition, new: Partition) -> None:
        """Refuse a ``memory.max`` below what the partition uses and cannot give back.

        cgroup2 does not refuse such a write as v1 does (``EBUSY``): it reclaims, then
        OOM-kills the partition's processes until they fit. A resize must never kill,
        so ask for the reclaim first (``memory.reclaim``) and refuse if it fell short."""
        cap = new.memory_max
        if cap is None or (old.memory_max is not None and cap >= old.memory_max):
            return
        d = self._dir(new.path)
        current = fs.try_read_int(d / "memory.current")
        if current is None or current <= cap:
            return
        if (d / "memory.reclaim").exists():
            try:
                fs.write_text(d / "memory.reclaim", str(current - cap), new.path)
            except BackendError:
                pass  # EAGAIN: could not reclaim that much; measured again below
            current = fs.try_read_int(d / "memory.current") or 0
        if current > cap:
            raise BackendError(
                f"partition '{new.path}': memory.max {format_size(cap)} is below what it "
                f"uses now ({format_size(current)}) and the kernel could not reclaim the "
                f"difference; cgroup2 would OOM-kill its processes to get there, so the "
                f"partition keeps its previous figures"
            )

    def _rearm_pressure(self, path: str) -> None:
        self._notifier.remove(lambda k: k == ("pressure", path, None))
        self._pressure_state.pop(path, None)
        d = self._dir(path)
        if self._partitions[path].pressure_threshold is not None:
            self._pressure_state[path] = fs.read_keyed(d / "memory.events").get("high", 0)
            self._watch_file(("pressure", path, None), d / "memory.events")

    def destroy(self, path: str) -> None:
        if not path:
            raise BackendError("destroy('') would remove the root; destroy its children")
        top = self._dir(path)
        with self._lock:
            self._forget(path)
        self._kill(top, path)
        for d in fs.subtree_dirs(top):
            self._rmdir(d, path)

    async def kill_leaf(self, path: str, leaf: str) -> list[int]:
        """``cgroup.kill``, then wait for ``populated 0`` in ``cgroup.events``: the kernel
        notifies that file's change (POLLPRI), so the wait is a sleep, not a poll loop.
        Kernels without ``cgroup.kill`` (before 5.14) use the base class's loop."""
        d = self._dir(path, leaf)
        if not (d / "cgroup.kill").exists():
            return await super().kill_leaf(path, leaf)
        watch = await trio.to_thread.run_sync(_EventsWatch.open, d / "cgroup.events")
        if watch is None:  # the leaf is gone: nothing left in it
            return []
        try:
            if watch.populated():
                await trio.to_thread.run_sync(fs.write_text, d / "cgroup.kill", "1", path)
            with trio.move_on_after(KILL_LEAF_TIMEOUT):
                while watch.populated():
                    await trio.lowlevel.wait_readable(watch.epoll.fileno())
                    watch.epoll.poll(0)  # drain: the next change re-arms it
        finally:
            watch.close()
        return await trio.to_thread.run_sync(self.pids, path, leaf)

    def _make_leaf_dirs(self, path: str, leaf: str) -> None:
        d = self._dir(path, leaf)
        self._mkdir(d, f"{path}/{fs.LEAF_PREFIX}{leaf}")
        # One worker is one unit: an OOM kill takes all of its processes, and only them.
        if _has_memory(d):
            fs.write_text(d / "memory.oom.group", "1", path)

    def _remove_dirs(self, path: str, leaf: str | None) -> list[str]:
        top = self._dir(path, leaf)
        self._kill(top, path)
        for d in fs.subtree_dirs(top):
            self._rmdir(d, path)
        return [str(top)]

    def close(self) -> None:
        super().close()
        # RAII for the root: remove it if the daemon destroyed everything below.
        if self.root.is_dir() and not any(p.is_dir() for p in self.root.iterdir()):
            try:
                self._rmdir(self.root, "")
            except BackendError:
                pass

    # ------------------------------------------------------------------ processes

    def spawn(self, request: SpawnRequest) -> subprocess.Popen[bytes]:
        self.ensure_leaf(request.partition, request.leaf)
        procs = [str(self._dir(request.partition, request.leaf) / "cgroup.procs")]
        kwargs = request.popen_kwargs()
        if self.spawn_strategy == "preexec":
            return subprocess.Popen(
                self.exec_argv(request), preexec_fn=fs.preexec_attach(procs), **kwargs
            )
        return fs.spawn_shim(self.exec_argv(request), procs, kwargs)

    def attach_plan(self, request: SpawnRequest) -> AttachPlan:
        self.ensure_leaf(request.partition, request.leaf)
        return AttachPlan(procs=(str(self._dir(request.partition, request.leaf) / "cgroup.procs"),))

    def attach(self, path: str, pid: int) -> str | None:
        if path not in self._partitions:
            raise BackendError(f"partition '{path}' was not created by this backend")
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                before: str | None = fs.own_cgroups(f.read()).get("")
        except OSError:
            before = None  # unknown: detach sends it to the daemon's own cgroup
        self.ensure_leaf(path, ATTACHED_LEAF)
        fs.write_text(self._dir(path, ATTACHED_LEAF) / "cgroup.procs", str(pid), path)
        return before

    def detach(self, pid: int, previous: object = None) -> None:
        home = self.mount / fs.own_cgroups().get("", "/").lstrip("/")
        target = home
        if isinstance(previous, str):
            # Back where attach found it, unless that is gone or inside our root.
            before = self.mount / previous.lstrip("/")
            if before.is_dir() and before != self.root and self.root not in before.parents:
                target = before
        try:
            fs.write_text(target / "cgroup.procs", str(pid), "")
        except BackendError:
            if target == home:
                raise
            # e.g. the old cgroup now has children with controllers (no internal processes)
            fs.write_text(home / "cgroup.procs", str(pid), "")

    def pids(self, path: str, leaf: str | None = None) -> list[int]:
        return fs.subtree_procs(self._dir(path, leaf))

    # ------------------------------------------------------------------ figures

    def _oom_count(self, path: str, leaf: str | None) -> int:
        d = self._dir(path, leaf)
        if not _has_memory(d):
            return 0  # no memory controller here: nothing can be OOM-killed by a limit
        # A partition's memory.events counts its leaves too; .local is its own share.
        name = "memory.events.local" if leaf is None else "memory.events"
        if leaf is None and not (d / name).exists():
            name = "memory.events"
        counters = fs.read_keyed(d / name)
        if not counters and not (d / name).exists():
            raise BackendError(f"partition '{path}': {d / name} is missing")
        return counters.get("oom_kill", 0)

    def _register(self, path: str, leaf: str | None) -> None:
        d = self._dir(path, leaf)
        if leaf is not None and not _has_memory(d):
            pass  # no memory.events to watch (see "Without the memory controller")
        elif leaf is not None:
            self._watch_file(("oom", path, leaf), d / "memory.events")
        else:
            node = self._partitions.get(path)
            if node is not None and node.pressure_threshold is not None:
                self._pressure_state[path] = fs.read_keyed(d / "memory.events").get("high", 0)
                self._watch_file(("pressure", path, None), d / "memory.events")
        self._note_registered(path, leaf)

    def _watch_file(self, key: fs.Key, file: Path) -> None:
        try:
            fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendError(
                f"partition '{key[1]}': opening {file} failed: "
                f"{errno.errorcode.get(exc.errno or 0)} ({exc.strerror})"
            ) from exc
        os.pread(fd, 4096, 0)  # arm: POLLPRI reports changes after this read
        self._notifier.add(key, fd, eventfd=False)

    def _pressure_check(self, path: str) -> dict[str, object] | None:
        d = self._dir(path)
        high = fs.read_keyed(d / "memory.events").get("high", 0)
        before = self._pressure_state.get(path, high)
        now = time.monotonic()
        if high <= before or now - self._last_pressure.get(path, -1e9) < PRESSURE_MIN_INTERVAL:
            return None  # not risen, or risen again within the rate limit (counted next time)
        self._pressure_state[path] = high
        self._last_pressure[path] = now
        node = self._partitions[path]
        return {
            "high_events": high,
            "new": high - before,
            "usage": fs.try_read_int(d / "memory.current"),
            "threshold": node.pressure_threshold,
            "max": node.memory_max,
        }

    def stats(self, path: str) -> PartitionStats:
        d = self._dir(path)
        limit = fs.try_read_int(d / "memory.max")  # "max" parses as None
        cpu = fs.read_keyed(d / "cpu.stat")
        usage, throttled = cpu.get("usage_usec"), cpu.get("throttled_usec")
        return PartitionStats(
            memory_current=fs.try_read_int(d / "memory.current"),
            memory_peak=fs.try_read_int(d / "memory.peak"),
            memory_limit=limit,
            memory_pressure_events=self._pressure_events.get(path, 0),
            oom_kills=fs.read_keyed(d / "memory.events").get("oom_kill"),
            cpu_usage_ns=usage * 1000 if usage is not None else None,
            cpu_throttled_ns=throttled * 1000 if throttled is not None else None,
            pids_current=fs.try_read_int(d / "pids.current"),
            pids=fs.subtree_procs(d),
        )


class _EventsWatch:
    """An open ``cgroup.events`` registered for POLLPRI in an epoll set of its own, whose
    fd trio can wait on. Reading the file re-arms the notification, and it is read after
    registering, so a change between the read and the wait is never missed."""

    def __init__(self, fd: int, epoll: select.epoll) -> None:
        self.fd = fd
        self.epoll = epoll

    @classmethod
    def open(cls, events: Path) -> _EventsWatch | None:
        try:
            fd = os.open(events, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        epoll = select.epoll()
        try:
            epoll.register(fd, select.EPOLLPRI)
        except OSError:
            epoll.close()
            os.close(fd)
            raise
        return cls(fd, epoll)

    def populated(self) -> bool:
        text = os.pread(self.fd, 4096, 0).decode()
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "populated":
                return value.strip() != "0"
        return False

    def close(self) -> None:
        self.epoll.close()
        os.close(self.fd)
