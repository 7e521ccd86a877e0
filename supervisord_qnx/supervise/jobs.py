"""Transient jobs: one-shot programs an operator runs in a partition of their own, the
seed's ``with_partition`` for operators (``systemd-run --wait -p MemoryMax=…``).

A job is a worker with the restart policy ``never`` that nobody configured, so it keeps
to the same rules as workers where they matter and is simpler everywhere else:

* **Its own leaf partition.** ``run`` under ``tenants/alpha`` creates the partition
  ``tenants/alpha/job-<id>`` with the job's own limits, admitted against its parent by
  the tree's rules (``max``, ``cpu.max`` and ``pids`` within the parent's, the parent's
  ``min`` and CPU budget not over-committed). The parent need not be ``hierarchical``:
  the job's partition is a leaf, as a worker's is, and never holds partitions itself.
  Controls the backend cannot enforce follow the daemon's ``enforcement`` policy:
  ``strict`` refuses the job, ``best-effort`` runs it and says what is not enforced.
* **The same spawn path.** The process is started by the worker launchers
  (``launch.py``) with a ``SpawnRequest``, so it is inside its partition before its
  first instruction, on every backend, and the reaper owns its status.
* **Owned by the daemon, not the caller.** Each job is a task in this module's
  nursery, which the daemon runs for its whole life: a client that disconnects after
  ``run`` leaves the job running to its end or its ``timeout``. At shutdown the
  remaining jobs are killed and their partitions removed.
* **Its end is an event** (``job-exit``) with the exit reason in the words workers use
  (``exit:N``, ``signal:NAME``, ``oom-killed``, ``memory-limit``, ``deadline``,
  ``spawn-failed: …``), after which its partition is gone.

The ``timeout`` is the job's deadline: the process group gets ``SIGTERM``, and after
``STOP_GRACE`` seconds everything left in the partition gets ``SIGKILL``; the exit
reason is ``deadline`` however it then ended.

Output goes to ``<log_dir>/job-<id>.log`` (ids count from 1 in each daemon run, so a
file of an earlier run with the same id is replaced); ``output`` reads it from an
offset, so a client can stream it while the job runs.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import signal
import stat
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio
from pydantic import ValidationError

from supervisord_qnx.config import identity
from supervisord_qnx.config.model import (
    CommandWorker,
    Cpu,
    DaemonSpec,
    Memory,
    WasmWorker,
    WorkerBase,
)
from supervisord_qnx.exits import ExitKind, ExitReason
from supervisord_qnx.partition.backend import Backend, BackendError, Enforcement, SpawnRequest
from supervisord_qnx.partition.process import ProcessSettings
from supervisord_qnx.partition.tree import Partition, PartitionTree
from supervisord_qnx.supervise import confine
from supervisord_qnx.supervise.events import EventBus, JobExited, JobStarted
from supervisord_qnx.supervise.launch import Launchers, LaunchTarget
from supervisord_qnx.supervise.reaper import ChildReaper, describe_status, signal_group

log = structlog.get_logger("supervisord_qnx.jobs")

# What ``status`` shows in the tenant column for jobs (their names are ``job:<id>``).
JOB_TENANT = "job"
# The process leaf inside the job's partition (cgroup backends put processes in leaves).
LEAF = "run"
# Seconds between SIGTERM at the deadline and SIGKILL of the whole partition.
STOP_GRACE = 2.0
# How long a stopped job's exit status is waited for at shutdown.
KILL_WAIT = 5.0
# Finished jobs kept for ``job`` calls (their results; their logs stay on disk).
FINISHED_KEPT = 256
# At most this much output per ``output`` call: a reply must stay far below the
# message size limit whatever the job printed.
OUTPUT_CHUNK = 256 * 1024

# The exit codes ``supervisorctl-qnx run`` ends with for ends that are not the job's own
# exit status (docs/configuration.md, "Transient jobs"). Below 128, where signals start;
# 125-127 follow `docker run` (125: the run itself failed; 127: could not be started)
# and 124 follows timeout(1).
CODE_OOM_KILLED = 122
CODE_MEMORY_LIMIT = 123
CODE_DEADLINE = 124
CODE_NOT_RUN = 125
CODE_OTHER_FAILURE = 126
CODE_START_FAILED = 127


def exit_code(reason: ExitReason) -> int:
    """The exit code a shell would see for a job that ended with ``reason``."""
    if reason.kind is ExitKind.EXIT:
        return int(reason.detail)
    if reason.kind is ExitKind.SIGNAL:
        try:
            return 128 + int(signal.Signals[reason.detail])
        except KeyError:
            return 128 + int(reason.detail) if reason.detail.isdigit() else CODE_OTHER_FAILURE
    return {
        ExitKind.OOM_KILLED: CODE_OOM_KILLED,
        ExitKind.MEMORY_LIMIT: CODE_MEMORY_LIMIT,
        ExitKind.DEADLINE: CODE_DEADLINE,
        ExitKind.SPAWN_FAILED: CODE_START_FAILED,
    }.get(reason.kind, CODE_OTHER_FAILURE)


class JobRefused(Exception):
    """The request cannot become a job. ``code`` is the protocol's error code
    (``bad_request``, ``not_found``, ``config_invalid``); ``problems`` lists why."""

    def __init__(self, code: str, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.problems = list(problems)


class JobNotFound(Exception):
    pass


@dataclass(eq=False)
class Job:
    id: int
    parent: str
    path: str
    spec: WorkerBase
    target: LaunchTarget
    timeout: float | None
    log: Path
    warnings: list[str]
    state: str = "starting"  # starting -> running -> exited
    pid: int | None = None
    started_at: float | None = None  # monotonic
    exit_reason: ExitReason | None = None
    spawned: trio.Event = field(default_factory=trio.Event)  # started, or failed to
    # Cancelled to stop the job early (daemon shutdown); the job's task then kills it.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def name(self) -> str:
        return f"{JOB_TENANT}:{self.id}"

    @property
    def kind(self) -> str:
        return "wasm" if isinstance(self.spec, WasmWorker) else "command"

    @property
    def command(self) -> list[str]:
        if isinstance(self.spec, CommandWorker):
            return list(self.spec.command)
        assert isinstance(self.spec, WasmWorker)
        return [str(self.spec.wasm), *self.spec.args]

    def status(self) -> dict[str, Any]:
        """The job as a row of ``status`` (the fields workers have)."""
        uptime = None
        if self.state == "running" and self.started_at is not None:
            uptime = round(time.monotonic() - self.started_at, 3)
        return {
            "tenant": JOB_TENANT,
            "worker": f"job-{self.id}",
            "instance": 0,
            "name": self.name,
            "kind": self.kind,
            "state": self.state,
            "pid": self.pid,
            "partition": self.path,
            "restarts": 0,
            "exit_reason": None if self.exit_reason is None else str(self.exit_reason),
            "uptime": uptime,
            "job": self.id,
        }

    def result(self) -> dict[str, Any]:
        """What ``run`` and ``job`` answer."""
        reason = self.exit_reason
        return {
            "job": self.id,
            "name": self.name,
            "kind": self.kind,
            "command": self.command,
            "partition": self.path,
            "pid": self.pid,
            "state": self.state,
            "done": self.done.is_set(),
            "exit_reason": None if reason is None else str(reason),
            "exit_code": None if reason is None or not self.done.is_set() else exit_code(reason),
            "timeout": self.timeout,
            "log": str(self.log),
            "warnings": list(self.warnings),
        }


def _limits_node(path: str, params: Mapping[str, Any]) -> Partition:
    """The job's partition from the request's ``memory``, ``cpu`` and ``pids`` (validated by
    the config models, so a job speaks the tenant files' units and rules)."""
    memory = params.get("memory")
    if memory is not None and not isinstance(memory, dict):
        memory = {"max": memory}  # a bare size is the max, as --memory-max
    cpu = params.get("cpu")
    if cpu is not None and not isinstance(cpu, dict):
        cpu = {"max": cpu}  # a bare percentage is the ceiling, as --cpu-max
    mem = Memory.model_validate(memory if memory is not None else {})
    cpus = Cpu.model_validate(cpu if cpu is not None else {})
    pids = params.get("pids")
    if pids is not None and (isinstance(pids, bool) or not isinstance(pids, int) or pids < 1):
        raise ValueError(f"pids: must be a positive integer, got {pids!r}")
    return Partition(
        path,
        memory_min=mem.min,
        memory_max=mem.max,
        memory_reserved=mem.reserved,
        cpu_budget=cpus.budget,
        cpu_max=cpus.max,
        pids_max=pids,
    )


def _validation_problems(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        out.append(f"{where}: {err['msg']}" if where else str(err["msg"]))
    return out


class Jobs:
    """Every transient job of the daemon; ``run`` owns their tasks for the daemon's life."""

    def __init__(
        self,
        tree: PartitionTree,
        backend: Backend,
        reaper: ChildReaper,
        launchers: Launchers,
        events: EventBus,
        *,
        log_dir: Path,
        enforcement: str,
        daemon_spec: DaemonSpec | None = None,
    ) -> None:
        self.tree = tree
        # default_user: who jobs run as (config/identity.py).
        self.daemon_spec = daemon_spec if daemon_spec is not None else DaemonSpec()
        self.backend = backend
        self.reaper = reaper
        self.launchers = launchers
        self.events = events
        self.log_dir = log_dir
        self.enforcement = enforcement
        self.running: dict[int, Job] = {}
        self.finished: OrderedDict[int, Job] = OrderedDict()
        self._next_id = 1
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the jobs' tasks; returns only when cancelled (then each job is killed and its
        partition removed before this returns)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()
        self._nursery = None

    # -- operator calls -------------------------------------------------------------

    async def start(self, params: Mapping[str, Any]) -> Job:
        """Admit a job and start it; returns once it runs (or failed to start).

        The job's task belongs to this object's nursery, not to the caller: cancelling the
        caller (a client that went away) does not touch the job."""
        if self._nursery is None:
            raise JobRefused("invalid_state", "the daemon is not running jobs (shutting down)")
        job = self._admit(params)
        self._nursery.start_soon(self._drive, job)
        await job.spawned.wait()
        return job

    async def stop_all(self) -> None:
        """Kill every running job and remove its partition (the daemon's shutdown, before
        the tenants stop: a job is no one's dependency)."""
        self._nursery = None  # refuse new jobs from here on
        jobs = list(self.running.values())
        for job in jobs:
            job.scope.cancel()
        for job in jobs:
            await job.done.wait()

    # -- what a reload or a ``set`` needs (supervise/reload.py's ``Transient``) ------

    def paths(self) -> list[str]:
        """The partitions of running jobs: created at runtime, in no file."""
        return [job.path for job in self.running.values()]

    def rebind(self, tree: PartitionTree) -> None:
        """Follow the daemon's new tree (after a reload or a ``set``, which carried the
        running jobs' partitions into it)."""
        self.tree = tree

    async def end_under(self, paths: Collection[str]) -> None:
        """End the jobs inside partitions a reload is about to remove (a partition
        cannot go while a job's partition is inside it), as at shutdown."""
        doomed = [
            job for job in self.running.values() if any(job.path.startswith(p + "/") for p in paths)
        ]
        for job in doomed:
            job.scope.cancel()
        for job in doomed:
            await job.done.wait()

    def get(self, job_id: int) -> Job:
        job = self.running.get(job_id) or self.finished.get(job_id)
        if job is None:
            raise JobNotFound(
                f"no job {job_id} (finished jobs are remembered for the last {FINISHED_KEPT})"
            )
        return job

    def status(self) -> list[dict[str, Any]]:
        return [job.status() for job in self.running.values()]

    def pids(self) -> list[int]:
        return [job.pid for job in self.running.values() if job.pid is not None]

    def read_output(self, job: Job, offset: int) -> tuple[bytes, int]:
        """Up to ``OUTPUT_CHUNK`` bytes of the job's log from ``offset``, and the offset after
        them. Blocking: call in a thread. Opened like worker logs are read: never through a
        symlink, never blocking on a FIFO."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(job.log, flags)
        except FileNotFoundError:
            return b"", offset
        try:
            data = os.pread(fd, OUTPUT_CHUNK, offset)
        finally:
            os.close(fd)
        return data, offset + len(data)

    # -- admission --------------------------------------------------------------------

    def _admit(self, params: Mapping[str, Any]) -> Job:
        parent = params["partition"].strip("/")
        if not parent or parent not in self.tree:
            raise JobRefused("not_found", f"no partition {params['partition']!r}")
        if any(job.path == parent for job in self.running.values()):
            # Its partition goes when that job ends, and everything inside with it.
            raise JobRefused("bad_request", f"'{parent}' is a job's partition; run beside it")
        job_id = self._next_id
        while f"{parent}/job-{job_id}" in self.tree:
            job_id += 1  # a configured partition of that name: never reuse it
        path = f"{parent}/job-{job_id}"
        try:
            node = _limits_node(path, params)
            spec = self._spec(job_id, params)
        except ValidationError as exc:
            problems = _validation_problems(exc)
            raise JobRefused("config_invalid", "; ".join(problems), problems) from None
        except ValueError as exc:
            raise JobRefused("config_invalid", str(exc), [str(exc)]) from None
        timeout = params.get("timeout")
        self.tree.add(node, parent)
        try:
            problems = self._problems(node)
            warnings = self._unenforced(node)
            if self.enforcement == "strict":
                problems += [
                    f"{w} (the daemon's enforcement is strict: drop the limit, or set "
                    f'[daemon] enforcement = "best-effort")'
                    for w in warnings
                ]
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise JobRefused(
                    "config_invalid",
                    f"the job does not fit in partition '{parent}': {problems[0]}{more}",
                    problems,
                )
        except BaseException:
            self.tree.remove(path)
            raise
        self._next_id = job_id + 1  # only jobs that run take an id
        target = LaunchTarget(JOB_TENANT, path, spec, 0, 1)
        target.leaf = f"job-{job_id}"  # the wasm runner's report file: one per job
        job = Job(
            job_id,
            parent,
            path,
            spec,
            target,
            None if timeout is None else float(timeout),
            self.log_dir / f"job-{job_id}.log",
            warnings if self.enforcement != "strict" else [],
        )
        self.running[job_id] = job
        return job

    def _spec(self, job_id: int, params: Mapping[str, Any]) -> WorkerBase:
        common: dict[str, Any] = {"name": f"job-{job_id}", "env": params.get("env", {})}
        if params.get("cwd") is not None:
            common["cwd"] = params["cwd"]
        if "wasm" in params:
            module = Path(params["wasm"])
            if not module.is_file():
                raise ValueError(f"wasm: no module file {str(module)!r} on the daemon's host")
            return WasmWorker(wasm=module, args=params.get("args", []), **common)
        return CommandWorker(command=params["command"], **common)

    def _problems(self, node: Partition) -> list[str]:
        """The admission rules, as far as they concern the job's partition and its siblings.
        Rule 1 (a child only under a ``hierarchical`` partition) is about partitions that
        hold partitions; a job's is a leaf, like a worker's."""
        parent = node.parent
        assert parent is not None
        found = [
            p.reason
            for p in self.tree.admit()
            if (p.partition == node.path and p.key != "parent") or p.partition == parent.path
        ]
        found += [p for p in self.backend.check(self.tree) if f"'{node.path}'" in p]
        return found

    def _unenforced(self, node: Partition) -> list[str]:
        levels = self.backend.enforcement()
        return [
            f"the job asks for {control}, which the {self.backend.name} backend does not enforce"
            for control in node.requested_controls()
            if levels.get(control, Enforcement.NONE) is Enforcement.NONE
        ]

    # -- the job's task -------------------------------------------------------------

    async def _drive(self, job: Job) -> None:
        """Start the job, wait for its end or its deadline, then remove its partition.

        A failure boundary: whatever goes wrong ends this job (``internal: …`` or
        ``backend: …``) and is logged; the daemon and other jobs carry on."""
        created = False
        try:
            with job.scope:
                await trio.to_thread.run_sync(self.backend.create, self.tree[job.path])
                created = True
                job.exit_reason = await self._run(job)
        except Exception as exc:  # the failure boundary of one job
            log.error("job failed", job=job.id, error=repr(exc), exc_info=exc)
            kind = ExitKind.BACKEND if isinstance(exc, BackendError) else ExitKind.INTERNAL
            job.exit_reason = ExitReason(kind, f"{type(exc).__name__}: {exc}")
        finally:
            with trio.CancelScope(shield=True):
                if job.exit_reason is None:  # stopped: the daemon is shutting down
                    job.exit_reason = ExitReason.signalled(signal.SIGKILL).as_stopped()
                await self._remove(job, created)
                job.state = "exited"
                job.spawned.set()
                job.done.set()
                self.running.pop(job.id, None)
                self.finished[job.id] = job
                while len(self.finished) > FINISHED_KEPT:
                    self.finished.popitem(last=False)
                reason = str(job.exit_reason)
                self.events.emit(
                    JobExited(job.name, job.path, job.pid, reason, exit_code(job.exit_reason))
                )

    async def _run(self, job: Job) -> ExitReason:
        try:
            pid = await self._spawn(job)
        except OSError as exc:
            return ExitReason(ExitKind.SPAWN_FAILED, exc.strerror or str(exc))
        job.pid, job.started_at, job.state = pid, time.monotonic(), "running"
        job.spawned.set()
        self.events.emit(JobStarted(job.name, job.path, pid, job.kind, job.command, job.timeout))
        status: int | None = None
        try:
            with trio.move_on_after(math.inf if job.timeout is None else job.timeout):
                status = await self.reaper.wait(pid)
            if status is None:
                status = await self._stop_at_deadline(job, pid)
                return ExitReason(ExitKind.DEADLINE, f"timeout {job.timeout:g}s")
        finally:
            if status is None:  # stopped: shutdown takes the job down with it
                with trio.CancelScope(shield=True):
                    signal_group(pid, signal.SIGKILL)
                    await self.backend.kill_leaf(job.path, LEAF)
                    # Bounded: if the reaper itself is being cancelled, no status comes.
                    with trio.move_on_after(KILL_WAIT):
                        await self.reaper.wait(pid)
        return await self._exit_reason(job, status)

    async def _stop_at_deadline(self, job: Job, pid: int) -> int:
        log.warning("job reached its deadline", job=job.id, timeout=job.timeout)
        signal_group(pid, signal.SIGTERM)
        with trio.move_on_after(STOP_GRACE):
            return await self.reaper.wait(pid)
        signal_group(pid, signal.SIGKILL)
        await self.backend.kill_leaf(job.path, LEAF)
        return await self.reaper.wait(pid)

    async def _spawn(self, job: Job) -> int:
        fd = await trio.to_thread.run_sync(_open_log, self.log_dir, job.log)
        try:
            launcher = self.launchers.for_spec(job.spec)
            argv = await trio.to_thread.run_sync(launcher.argv, job.target)
            request = SpawnRequest(
                partition=job.path,
                leaf=LEAF,
                argv=argv,
                cwd=str(job.spec.cwd) if job.spec.cwd else None,
                env=self._env(job),
                stdout=fd,
                stderr=fd,
                process=await trio.to_thread.run_sync(self._process_settings),
            )
            return await launcher.spawn(job.target, request)
        finally:
            os.close(fd)

    def _process_settings(self) -> ProcessSettings:
        """Who a job runs as (config/identity.py): the default user, no privileges."""
        try:
            return identity.job_settings(self.daemon_spec)
        except identity.IdentityError as exc:
            raise OSError(errno.EPERM, f"{exc.key}: {exc.reason}") from None

    def _env(self, job: Job) -> dict[str, str]:
        # As for workers: a small, predictable environment, not the daemon's own.
        env = {
            "PATH": confine.WORKER_PATH,
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "SUPERVISORD_QNX_JOB": str(job.id),
            "SUPERVISORD_QNX_PARTITION": job.path,
        }
        env.update(job.spec.env)
        return env

    async def _exit_reason(self, job: Job, status: int) -> ExitReason:
        """As for workers: the backend's ``oom-killed``/``memory-limit`` over what the wasm
        runner reported over the wait status."""
        told = await trio.to_thread.run_sync(self.backend.leaf_exit_reason, job.path, LEAF)
        if told is not None:
            return ExitReason.parse(told)
        reported = await self.launchers.for_spec(job.spec).exit_reason(job.target, status)
        return reported if reported is not None else describe_status(status)

    async def _remove(self, job: Job, created: bool) -> None:
        """Kill whatever the job left behind and remove its partition (and leaf)."""
        try:
            if created:
                await self.backend.kill_leaf(job.path, LEAF)
                await trio.to_thread.run_sync(self.backend.destroy, job.path)
        except Exception as exc:  # noqa: BLE001 - logged; the tree entry goes regardless
            log.error("could not remove a job's partition", job=job.id, error=str(exc))
        finally:
            if job.path in self.tree:
                self.tree.remove(job.path)
            if isinstance(job.spec, WasmWorker):
                with contextlib.suppress(OSError):
                    self.launchers.wasm.report_path(job.target).unlink()


def _open_log(log_dir: Path, path: Path) -> int:
    """A fresh log for the job (replacing one of an earlier run with the same id); never
    through a symlink planted at the path, never blocking on a FIFO there."""
    log_dir.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o640)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            raise OSError(exc.errno, f"log file {path} is not a regular file") from None
        raise
    try:
        # A device node or other non-file planted at the path is refused, as for workers.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"log file {path} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
