"""The ``qnx`` backend: QNX adaptive partitioning (APS) for CPU, rlimits and user-space
accounting for memory.

QNX gives a supervisor three tools, and each does one part:

* **APS partitions** (``aps create``, ``on -X aps=NAME``): a partition's *budget* is a
  share of the whole machine guaranteed under contention, while idle time still goes to
  whoever wants it; exactly our ``cpu.budget``. A child's budget is carved from its
  parent's, as in our tree: the parent is the partition of the process that runs
  ``aps create``, so a nested partition is created by running ``aps create`` inside its
  parent with ``on -X aps=PARENT``. ``-m max_budget`` caps a partition even when the
  machine is idle, but only while the scheduler policy ``limit_cpu_usage`` is set; the
  backend sets it (``aps modify -S limit_cpu_usage``) the first time a partition asks for
  ``cpu.max``, or reports ``cpu.max`` as unenforced if built with
  ``limit_cpu_usage=False``. APS knows nothing of memory.
* **rlimits**, applied by ``on -L DATA:cur:max`` before the tenant's first instruction.
  ``RLIMIT_DATA`` and not ``RLIMIT_AS``: wasmtime reserves gigabytes of ``PROT_NONE``
  address space per linear memory (guard regions), which counts against ``AS`` and would
  make every wasm worker fail at instantiation, while ``DATA`` counts memory the
  process can actually write. An rlimit is per process, so it is the ceiling on what one
  process can overshoot between two accounting samples, not the partition's cap.
* **user-space accounting** of each partition's processes (shared with the portable
  backend, which owns the code: ``partition.accounting`` and ``PortableBackend.sample``):
  above ``max - reserved`` a memory-pressure event, above ``max`` the partition's
  processes are killed and their exit reason is ``memory-limit``. It reads the
  Linux ``/proc`` layout; where that is missing (QNX's ``/proc/<pid>/as`` is a devctl
  interface, not text) ``enforcement()`` says memory is not enforced rather than
  pretending.

Partition names: APS names are flat and at most 15 characters; ``qnx_names`` maps tree
paths deterministically and ``check`` reports paths that cannot map, names that
collide and trees with more partitions than the platform allows (32 including System in
QNX 7.x), so ``--check`` finds them before anything runs.

Partitions without a budget get no APS partition: their workers run in the nearest
ancestor's, or in the daemon's own partition.

APS partitions cannot be deleted before reboot (7.x ``aps`` has no delete command), so
``destroy`` kills the processes and hands the budget back to the parent with
``aps modify -b 0``, and ``create`` reuses a partition of the same name left by an
earlier run (``aps modify`` to the configured figures) instead of failing.

Workers are started as ``on -X aps=NAME -L DATA:n:n -- argv`` with the tag
``SUPERVISORD_QNX_LEAF=<path>:<leaf>`` in their environment, in a new session; on
the qnx-sim simulator ``on`` execs, so the worker keeps the pid the supervisor saw.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence

from supervisord_qnx.partition import accounting, proctime
from supervisord_qnx.partition import qnx_realtime as qrt
from supervisord_qnx.partition.backend import (
    Backend,
    BackendError,
    BackendOptions,
    Control,
    Enforcement,
    EventSink,
    PartitionStats,
    SpawnRequest,
    UtilityRunner,
)
from supervisord_qnx.partition.controls import Flag
from supervisord_qnx.partition.portable import RLIMIT_SLACK, PortableBackend
from supervisord_qnx.partition.process import ProcessSettings, wrapped_argv
from supervisord_qnx.partition.qnx_names import SYSTEM, UnmappablePath, aps_name, collisions
from supervisord_qnx.partition.tree import Partition, PartitionTree
from supervisord_qnx.units import format_size

DEFAULT_MAX_PARTITIONS = 32  # QNX 7.0/7.1 adaptive partitioning, System included (6.x: 8)
_TIMEOUT = 30.0

#: Runs a helper command to completion and returns its real exit status.


def _run_plain(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=_TIMEOUT)


def _pct(value: float) -> str:
    return f"{value:g}"


def _descendants(node: Partition) -> list[Partition]:
    out = []
    for child in node.children.values():
        out.append(child)
        out.extend(_descendants(child))
    return out


class QnxBackend(Backend):
    """APS partitions for CPU, ``on -L`` rlimits and sampled accounting for memory.

    ``aps`` and ``on`` are looked up on ``PATH`` (the qnx-sim simulators stand in on
    Linux). ``max_partitions`` is the platform's APS limit including System;
    ``home_partition`` is where ``detach`` returns a process (the partition the daemon
    itself was started in by the rc script or SLM).
    """

    name = "qnx"

    def __init__(
        self,
        sample_interval: float = 0.25,
        *,
        aps: str = "aps",
        on: str = "on",
        max_partitions: int = DEFAULT_MAX_PARTITIONS,
        limit_cpu_usage: bool = True,
        home_partition: str = SYSTEM,
    ) -> None:
        self.sample_interval = sample_interval
        # QNX's own `on` switches user (-u), locks abilities (-A) and sets limits (-L)
        # for the worker (docs/security.md#tenants); qnx-sim's `on` does not.
        self.native_on_identity = sys.platform.startswith("qnx")
        self.max_partitions = max_partitions
        self.limit_cpu_usage = limit_cpu_usage
        self.home_partition = home_partition
        self._aps = aps
        self._on = on
        # Accounting is the portable backend's; we keep its partition registry in step.
        self._accounting = PortableBackend(sample_interval)
        self._can_account = os.path.exists("/proc/self/stat")
        self._partitions: dict[str, Partition] = {}
        self._policy_set = False
        self._run_utility: UtilityRunner = _run_plain
        # Start times through QNX's own means (procfs devctl, or `pidin` under qnx-sim),
        # never Linux's /proc/PID/stat: partition/proctime.py.
        self._clock = proctime.QnxClock(_run_plain)

    def set_owner(self, owner: str) -> None:
        self._accounting.set_owner(owner)

    def use_utility_runner(self, runner: UtilityRunner) -> None:
        """Run ``aps``/``on`` through ``runner`` from now on.

        Inside the daemon this must be the child reaper's ``run_utility``: the reaper
        collects every zombie child it does not know of (adopted orphans), and a plain
        ``subprocess.run`` in a worker thread races it for the helper's status. When
        the sweep wins, Python reports exit 0, so a failed ``aps create`` (EEXIST on
        a restart) passes for success and the partition keeps its old budget.
        """
        self._run_utility = runner
        self._clock.use_runner(runner)

    # -- capability ---------------------------------------------------------------

    @classmethod
    def from_options(cls, options: BackendOptions) -> QnxBackend:
        backend = cls(sample_interval=options.sample_interval)
        if options.run_utility is not None:
            backend.use_utility_runner(options.run_utility)
        return backend

    @classmethod
    def probe(cls, options: BackendOptions = BackendOptions()) -> str | None:  # noqa: B008, ARG003
        for tool in ("aps", "on"):
            if shutil.which(tool) is None:
                return (
                    f"no '{tool}' utility on PATH: the qnx backend needs QNX adaptive "
                    "partitioning (on Linux, put qnx-sim/bin on PATH to simulate it)"
                )
        cmd = ["aps", "show", "-f", "scheduler"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{shlex.join(cmd)}` could not run: {exc}"
        if proc.returncode != 0:
            return (
                f"`{shlex.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()} "
                "(is the APS module in the OS image?)"
            )
        return None

    def enforcement(self) -> Mapping[Control, Enforcement]:
        memory = Enforcement.SUPERVISED if self._can_account else Enforcement.NONE
        return {
            Control.MEMORY_MIN: Enforcement.NONE,
            Control.MEMORY_MAX: memory,
            Control.MEMORY_RESERVED: memory,
            Control.CPU_BUDGET: Enforcement.KERNEL,
            Control.CPU_MAX: Enforcement.KERNEL if self.limit_cpu_usage else Enforcement.NONE,
            # RLIMIT_NPROC counts a user's processes, not a partition's: no fit.
            Control.PIDS: Enforcement.NONE,
            Control.MEMORY_ISOLATION: Enforcement.KERNEL,
            Control.CONTAINER: Enforcement.NONE,
            Control.SECCOMP: Enforcement.NONE,  # no seccomp; procmgr abilities instead
            Control.CPUSET: Enforcement.KERNEL,  # on -R runmask
            Control.CPU_CRITICAL: Enforcement.KERNEL,  # aps create -B/-P
        }

    # -- admission ----------------------------------------------------------------

    def check(self, tree: PartitionTree) -> list[str]:
        problems = qrt.check(tree)
        budgeted = [p.path for p in tree if p.cpu_budget is not None]
        for path in budgeted:
            try:
                aps_name(path)
            except UnmappablePath as exc:
                problems.append(f"partition '{path}' has no valid APS partition name: {exc}")
        for name, paths in collisions(budgeted).items():
            listed = ", ".join(f"'{p}'" for p in paths)
            problems.append(
                f"partitions {listed} all map to the APS name {name!r}; rename one of them"
            )
        if len(budgeted) + 1 > self.max_partitions:
            problems.append(
                f"{len(budgeted)} partitions set cpu.budget and each needs its own APS "
                f"partition, but QNX allows at most {self.max_partitions} including System "
                f"({self.max_partitions - 1} for the daemon); give budgets to groups instead "
                "of to every tenant"
            )
        return problems

    def describe(self, tree: PartitionTree) -> dict[str, str]:
        out = {}
        for node in tree:
            try:
                home = self._aps_home(node)
            except UnmappablePath as exc:
                out[node.path] = f"unmappable: {exc}"
                continue
            if node.cpu_budget is not None:
                parent = self._aps_home(node.parent) if node.parent else None
                text = f"APS partition {home} (budget {_pct(node.cpu_budget)}%"
                if node.cpu_max is not None:
                    text += f", max {_pct(node.cpu_max)}%"
                text += f", parent {parent or 'the daemon partition'})"
            elif home is not None:
                text = f"runs in APS partition {home}"
            else:
                text = "runs in the daemon's own APS partition"
            cap = node.effective_memory_max
            if cap is not None:
                text += f"; RLIMIT_DATA {format_size(cap * RLIMIT_SLACK)} per process"
            out[node.path] = text
        return out

    # -- partitions ---------------------------------------------------------------

    def reap_leftovers(self) -> list[str]:
        # Leftover APS partitions are reused by create(). Leftover processes carry only
        # a tag that cannot tell this daemon's from another instance's: leave them.
        return []

    def create(self, partition: Partition) -> None:
        self._partitions[partition.path] = partition
        self._accounting.create(partition)
        if partition.cpu_budget is None:
            return
        name = self._name(partition.path)
        options = ["-b", _pct(partition.cpu_budget), *qrt.aps_options(partition)]
        if self.limit_cpu_usage:
            if partition.cpu_max is not None and not self._policy_set:
                self._run([self._tool(self._aps), "modify", "-S", "limit_cpu_usage"], partition)
                self._policy_set = True
            # Always pass -m so a reused partition loses a max it no longer has.
            options += ["-m", _pct(partition.cpu_max if partition.cpu_max is not None else 100)]
        cmd = [self._tool(self._aps), "create", *options, name]
        parent = self._aps_home(partition.parent) if partition.parent else None
        if parent is not None:
            # The new partition's budget comes from the partition aps runs in.
            cmd = [self._tool(self._on), "-X", f"aps={parent}", "--", *cmd]
        proc = self._call(cmd, partition)
        if proc.returncode == 0:
            return
        existing = self._existing(partition)
        if name not in existing:
            raise self._error(partition.path, cmd, proc)
        # Left by an earlier run (APS partitions live until reboot): reconfigure it. A
        # daemon that died without shutting down (SIGKILL, a crash) left every budget in
        # place, its children's carved from this one: hand those back first, deepest
        # first, or the reconfiguration cannot find the budget it asks for.
        below = [n for n in _descendants(partition) if n.cpu_budget is not None]
        for sub in sorted(below, key=lambda n: -n.depth):
            if aps_name(sub.path) in existing:
                self._run([self._tool(self._aps), "modify", "-b", "0", aps_name(sub.path)], sub)
        modify = [self._tool(self._aps), "modify", *options, name]
        proc = self._call(modify, partition)
        if proc.returncode != 0:
            error = self._error(partition.path, modify, proc)
            raise BackendError(
                f"{error} (reusing the APS partition {name!r} left by an earlier run; "
                "partitions of tenants no longer configured keep their budgets until "
                "reboot: `aps show` lists them, `aps modify -b 0 NAME` frees one)"
            )

    def update_limits(self, partition: Partition) -> None:
        """CPU figures with ``aps modify`` on the live APS partition; memory figures in the
        accounting (see ``PortableBackend.update_limits``; ``on -L`` rlimits reach a
        process at its next start). Giving a partition a budget, or taking its budget
        away, would move its processes to another APS partition: refused, restart the
        tenant for that."""
        path = partition.path
        old = self._partitions.get(path)
        if old is None:
            raise BackendError(f"partition '{path}' was not created by this backend")
        if (old.cpu_budget is None) != (partition.cpu_budget is None):
            raise BackendError(
                f"partition '{path}': adding or removing cpu.budget changes the APS partition "
                "its processes run in, which cannot happen in place; restart the tenant"
            )
        cpu_changed = old.cpu_budget != partition.cpu_budget or old.cpu_max != partition.cpu_max
        if cpu_changed and partition.cpu_budget is not None:
            self._aps_modify(partition)
        try:
            self._accounting.update_limits(partition)
        except BackendError:
            if cpu_changed and old.cpu_budget is not None:
                self._aps_modify(old)
            raise
        self._partitions[path] = partition

    def _aps_modify(self, node: Partition) -> None:
        assert node.cpu_budget is not None
        options = ["-b", _pct(node.cpu_budget)]
        if self.limit_cpu_usage:
            if node.cpu_max is not None and not self._policy_set:
                self._run([self._tool(self._aps), "modify", "-S", "limit_cpu_usage"], node)
                self._policy_set = True
            options += ["-m", _pct(node.cpu_max if node.cpu_max is not None else 100)]
        self._run([self._tool(self._aps), "modify", *options, self._name(node.path)], node)

    def adopt(self, tree: PartitionTree) -> None:
        self._accounting.adopt(tree)
        for path in list(self._partitions):
            if path in tree:
                self._partitions[path] = tree[path]

    def destroy(self, path: str) -> None:
        self._accounting.destroy(path)  # kills every process left in the subtree
        doomed = [p for p in self._partitions if p == path or p.startswith(path + "/")]
        failures = []
        for sub in sorted(doomed, key=lambda p: (-p.count("/"), p)):
            node = self._partitions.pop(sub)
            if node.cpu_budget is None:
                continue
            # No delete in APS: give the budget back to the parent, keep the name.
            cmd = [self._tool(self._aps), "modify", "-b", "0", self._name(sub)]
            proc = self._call(cmd, node)
            if proc.returncode != 0:
                failures.append(str(self._error(sub, cmd, proc)))
        if failures:
            raise BackendError("; ".join(failures))

    # -- processes ----------------------------------------------------------------

    def spawn(self, request: SpawnRequest) -> subprocess.Popen[bytes]:
        node = self._partitions.get(request.partition)
        if node is None:
            raise BackendError(f"partition '{request.partition}' was not created")
        env = dict(request.env)
        env[accounting.TAG] = accounting.tag_value(request.partition, request.leaf)
        if self._accounting.owner is not None:
            env[accounting.OWNER] = self._accounting.owner
        # The qnx-sim simulator's own settings, so its `on` finds the daemon's simulated
        # partitions; its `on` removes them before exec and QNX never sets them.
        env.update({k: v for k, v in os.environ.items() if k.startswith("QNX_SIM_")})
        argv = self.launch_argv(node, self.exec_argv(request), request.process)
        return subprocess.Popen(argv, **request.popen_kwargs(env))

    def exec_argv(self, request: SpawnRequest) -> list[str]:
        """Scheduling, runmask and memlock go to ``on`` (``launch_argv``). On QNX the
        identity, ability lock and limits go to ``on`` too (``on_options``) and only the
        umask stays a ``/bin/sh`` wrapper; elsewhere (the qnx-sim simulator on Linux) the
        Linux wrappers apply them."""
        rest = qrt.without_on_settings(request.process)
        if not self.native_on_identity:
            return wrapped_argv(rest, request.argv)
        return wrapped_argv(ProcessSettings(umask=rest.umask), request.argv)

    def launch_argv(
        self, node: Partition, argv: Sequence[str], process: ProcessSettings | None = None
    ) -> list[str]:
        """``on`` with the partition and limits, then the worker's own argv."""
        options = qrt.on_options(node, process) if process is not None else []
        if process is not None and self.native_on_identity:
            options += on_options(process)
        home = self._aps_home(node)
        if home is not None:
            options += ["-X", f"aps={home}"]
        cap = node.effective_memory_max
        if cap is not None:
            limit = cap * RLIMIT_SLACK
            options += ["-L", f"DATA:{limit}:{limit}"]
        if any(Flag.MEMORY_ISOLATION in p.flags for p in (node, *node.ancestors())):
            options += ["-L", "CORE:0:0"]  # a crash must not dump tenant memory
        if not options:
            return list(argv)
        return [self._tool(self._on), *options, "--", *argv]

    def attach(self, path: str, pid: int) -> list[int] | None:
        node = self._partitions.get(path)
        if node is None:
            raise BackendError(f"partition '{path}' was not created by this backend")
        home = self._aps_home(node)
        if home is not None:
            self._run([self._tool(self._aps), "join", "-p", str(pid), home], node)
        if hasattr(resource, "prlimit"):
            return self._accounting.attach(path, pid)
        return None

    def detach(self, pid: int, previous: object = None) -> None:
        # APS does not say which partition a process was in before, so it goes to the
        # daemon's home partition; the rlimit attach changed is restored.
        cmd = [self._tool(self._aps), "join", "-p", str(pid), self.home_partition]
        try:
            proc = self._run_utility(cmd)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"pid {pid}: `{shlex.join(cmd)}`: {exc}") from exc
        self._accounting.detach(pid, previous if hasattr(resource, "prlimit") else None)
        if proc.returncode != 0:
            raise BackendError(
                f"pid {pid}: `{shlex.join(cmd)}` failed (exit {proc.returncode}): "
                f"{proc.stderr.strip()}"
            )

    def pids(self, path: str, leaf: str | None = None) -> list[int]:
        return self._accounting.pids(path, leaf)

    def adopt_worker(self, path: str, leaf: str, pid: int) -> None:
        self._accounting.adopt_worker(path, leaf, pid)

    def process_clock(self) -> proctime.QnxClock:
        return self._clock

    def stats(self, path: str) -> PartitionStats:
        return self._accounting.stats(path)

    def stats_many(self, paths: Sequence[str]) -> dict[str, PartitionStats | Exception]:
        return self._accounting.stats_many(paths)

    def leaf_exit_reason(self, path: str, leaf: str) -> str | None:
        return self._accounting.leaf_exit_reason(path, leaf)

    async def watch(self, tree: PartitionTree, emit: EventSink) -> None:
        if self._can_account:
            await self._accounting.watch(tree, emit)

    # -- helpers ------------------------------------------------------------------

    def _name(self, path: str) -> str:
        try:
            return aps_name(path)
        except UnmappablePath as exc:
            raise BackendError(f"partition '{path}': {exc}") from None

    def _aps_home(self, node: Partition | None) -> str | None:
        """The APS partition a node's processes run in: its own if it has a budget, else
        the nearest budgeted ancestor's; ``None`` for the daemon's own partition."""
        while node is not None and node.path:
            if node.cpu_budget is not None:
                return aps_name(node.path)
            node = node.parent
        return None

    @staticmethod
    def _tool(name: str) -> str:
        # Resolved with the daemon's PATH, not the tenant's environment.
        return shutil.which(name) or name

    def _call(self, cmd: list[str], node: Partition) -> subprocess.CompletedProcess[str]:
        try:
            return self._run_utility(cmd)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"partition '{node.path}': `{shlex.join(cmd)}`: {exc}") from exc

    def _run(self, cmd: list[str], node: Partition) -> None:
        proc = self._call(cmd, node)
        if proc.returncode != 0:
            raise self._error(node.path, cmd, proc)

    @staticmethod
    def _error(path: str, cmd: list[str], proc: subprocess.CompletedProcess[str]) -> BackendError:
        return BackendError(
            f"partition '{path}': `{shlex.join(cmd)}` failed (exit {proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip() or 'no message'}"
        )

    def _existing(self, node: Partition) -> set[str]:
        """Names ``aps show -f partitions`` lists (first column of rows with a numeric id)."""
        proc = self._call([self._tool(self._aps), "show", "-f", "partitions"], node)
        names = set()
        for line in proc.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                names.add(fields[0])
        return names


# QNX `on -L` resource names for the settings' limits.
_ON_LIMITS = (
    ("NOFILE", "rlimit_nofile"),
    ("CORE", "rlimit_core"),
    ("NPROC", "rlimit_nproc"),
    ("STACK", "rlimit_stack"),
)


def on_options(s: ProcessSettings) -> list[str]:
    """QNX ``on`` options for a worker's identity and privileges (docs/security.md):
    ``-u uid:gid[,gid...]``, ``-A lock`` for ``no_new_privs`` (its abilities can no
    longer be changed), ``-L NAME:n:n`` per limit. Capabilities have no ``on`` form
    (a non-root process holds no privileged ability unless ``secpol`` grants one)."""
    out: list[str] = []
    if s.uid is not None:
        spec = str(s.uid)
        if s.gid is not None:
            spec += f":{s.gid}" + "".join(f",{g}" for g in s.groups or ())
        out += ["-u", spec]
    if s.no_new_privs:
        out += ["-A", "lock"]
    for name, field in _ON_LIMITS:
        value = getattr(s, field)
        if value is not None:
            shown = "unlimited" if value < 0 else str(value)
            out += ["-L", f"{name}:{shown}:{shown}"]
    return out
