"""Carrying on after a previous daemon: its workers adopted, its decisions kept
(``[daemon] on_restart``; docs/operations.md, "Upgrades and restarts"; docs/state.md).

At start-up, before anything is reaped, the daemon reads the runtime state its
predecessor wrote (``state.py``) and decides, per worker instance:

* **adopt**: the recorded pid is alive *and* is the recorded process: same boot, same
  start time (``/proc/PID/stat`` field 22, taken after a pidfd was opened on it, so the
  pid cannot be reused between the check and the watch), and on the cgroup backends
  in the worker's leaf (``cgroup.procs``). It keeps running, with its uptime;
* **lost**: recorded as running, but the pid is gone or now another process (a
  reused pid is never touched): the worker is reported ended (``exit:unknown``) and
  its restart policy restarts it;
* **resume backoff**: it was waiting to restart; the restart comes on its schedule;
* **stop**: it was being stopped, its tenant was removed, its partition changed, its
  kind cannot be adopted (today every kind can: commands and wasm runners), or
  ``on_restart = "restart"``: the verified process is stopped (SIGTERM, then SIGKILL),
  and the tenant starts fresh.

An adopted process is not our child after a crash (it was re-parented), so no wait
status will come: its end is watched through a pidfd (``pidfd_open`` + ``wait_readable``
on Linux >= 5.3), within the event loop's latency like a child's; where there is no
pidfd (QNX, old kernels) its start time is polled every ``POLL_INTERVAL`` seconds.
After a ``reexec`` (same pid) the workers are still our children: the reaper waits for
them and their real wait status is reported.

Log writers outlive the daemon (logpipe.py): an adopted worker's stdout still goes to
the writer it had. To write the run-end mark after the run, the daemon opens the
writer's end of the pipe again through ``/proc/WRITER/fd/0`` (checked: same writer by
start time, same pipe by inode). Where that fails (no such /proc, QNX), the worker's
lines still reach its files; only the mark is missing, and the next run gets a new
writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from supervisord_qnx.config.model import TenantSpec, WorkerBase
from supervisord_qnx.digest import sha256_hex
from supervisord_qnx.exits import ExitReason
from supervisord_qnx.partition.backend import Backend
from supervisord_qnx.partition.proctime import LINUX, LinuxClock, QnxClock
from supervisord_qnx.supervise import logpipe
from supervisord_qnx.supervise.leftovers import term_then_kill
from supervisord_qnx.supervise.reaper import ChildReaper
from supervisord_qnx.supervise.supervisor import Instance, Supervisor
from supervisord_qnx.supervise.worker import State

log = structlog.get_logger("supervisord_qnx.adopt")

# Where there is no pidfd: how often an adopted (non-child) worker's liveness is read.
POLL_INTERVAL = 0.25
# How long a stopped leftover gets between SIGTERM and SIGKILL.
LEFTOVER_STOP_WAIT = 5.0
# A wasm worker is a runner process like any other; its report file's path is the
# instance's own (WasmLauncher.report_path), and the runner keeps writing it.
ADOPTABLE_KINDS = frozenset({"command", "wasm"})
Clock = LinuxClock | QnxClock


def definition(
    tenant: TenantSpec, worker: WorkerBase, cache: dict[tuple[int, int], Fingerprint] | None = None
) -> str:
    """A fingerprint of what a worker runs: a change while no daemon ran restarts it.

    ``cache``: fingerprints by the ids of the specs, which its entries keep alive (an id
    is never reused while its object lives, so the identity check cannot be fooled).
    Specs are frozen, so the fingerprint of the same two objects never changes, and every
    state write asks for it once per instance. ``snapshot`` passes a new cache each time,
    filled from the last one: only the specs of the instances it wrote are kept, so the
    specs a reload replaced are let go at the next write (a cache that outlived them grew
    the daemon by about 20 MiB a minute in the soak, which reloads every few seconds)."""
    key = (id(tenant), id(worker))
    known = _LAST.get(key)
    if known is None or known[0] is not tenant or known[1] is not worker:
        data = {"partition": tenant.path, "worker": worker.model_dump(mode="json")}
        text = json.dumps(data, sort_keys=True, default=str)
        known = (tenant, worker, sha256_hex(text.encode())[:16])
    if cache is not None:
        cache[key] = known
    return known[2]


# (tenant spec, worker spec, fingerprint), by the specs' ids.
Fingerprint = tuple[TenantSpec, WorkerBase, str]
# The fingerprints the last snapshot used (see ``definition``).
_LAST: dict[tuple[int, int], Fingerprint] = {}


def kind_of(inst: Instance) -> str:
    return str(getattr(inst.spec, "kind", "command"))


# -- writing: what the state file holds ------------------------------------------------


def snapshot(supervisor: Supervisor, overrides: dict[str, Any]) -> dict[str, Any]:
    """The body of the runtime state now. Runs in the event loop (consistent, cheap)."""
    global _LAST
    fingerprints: dict[tuple[int, int], Fingerprint] = {}
    tenants: dict[str, Any] = {}
    for name, tenant in supervisor.tenants.items():
        instances = {
            inst.leaf: instance_record(inst, definition(tenant.spec, inst.spec, fingerprints))
            for inst in tenant.instances
        }
        tenants[name] = {"operator": tenant.operator, "instances": instances}
    _LAST = fingerprints
    out = snapshot_head(supervisor, overrides)
    out["tenants"] = tenants
    return out


def instance_record(inst: Instance, fingerprint: Any) -> dict[str, Any]:
    """One instance's entry in the runtime state (the same for ``snapshot`` and for the
    kept texts of supervise/statebody.py, which tests compare)."""
    lc = inst.lc
    writer = inst.log_writer
    writer_rec = None
    if writer is not None and writer.fd >= 0 and not writer.done.is_set():
        with contextlib.suppress(OSError):
            writer_rec = {
                "pid": writer.pid,
                "ticks": inst.writer_ticks,
                "pipe": os.fstat(writer.fd).st_ino,
            }
    return {
        "state": str(lc.state),
        "want_running": lc.want_running,
        "pid": lc.pid,
        "ticks": inst.ticks if lc.pid is not None else None,
        "started_at": lc.started_at if lc.pid is not None else None,
        "restarts": lc.restarts,
        "backoff_until": lc.deadline if lc.state is State.BACKOFF else None,
        "exit_reason": None if lc.exit_reason is None else str(lc.exit_reason),
        "partition": inst.partition,
        "kind": kind_of(inst),
        "definition": fingerprint,
        "writer": writer_rec,
    }


def snapshot_head(supervisor: Supervisor, overrides: dict[str, Any]) -> dict[str, Any]:
    """The body of the runtime state without its ``tenants`` (supervise/statebody.py
    keeps those as text)."""
    return {
        "boot_id": supervisor.backend.process_clock().boot_id(),
        "daemon_pid": os.getpid(),
        "written_at": time.time(),
        "monotonic": time.monotonic(),
        "overrides": overrides,
    }


# -- reading: what to do with it -------------------------------------------------------


@dataclass
class Adoptee:
    tenant: str
    leaf: str
    partition: str
    pid: int
    ticks: int | str
    started_at: float
    child: bool  # still our child (after a reexec): the reaper waits for it
    pidfd: int | None
    changed: bool  # its definition changed meanwhile: restart it once adopted
    writer: dict[str, Any] | None


@dataclass
class Plan:
    adopt: list[Adoptee] = field(default_factory=list)
    lost: list[tuple[str, str, int]] = field(default_factory=list)
    backoff: list[tuple[str, str, float]] = field(default_factory=list)
    restarts: dict[tuple[str, str], int] = field(default_factory=dict)
    reasons: dict[tuple[str, str], str] = field(default_factory=dict)  # last exit reasons
    operator: dict[str, str] = field(default_factory=dict)
    stop: list[tuple[int, int | str]] = field(default_factory=list)  # (pid, ticks), verified
    overrides: dict[str, Any] = field(default_factory=dict)
    reexec: bool = False
    # How start times are read on this platform (the backend's: partition/proctime.py).
    clock: Clock = LINUX

    @property
    def keep(self) -> set[tuple[str, str]]:
        return {(a.partition, a.leaf) for a in self.adopt}

    def close(self) -> None:
        for a in self.adopt:
            if a.pidfd is not None:
                os.close(a.pidfd)
                a.pidfd = None


def _open_pidfd(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return int(opener(pid))
    except OSError:
        return None


def _verify(pid: Any, ticks: Any, clock: Clock) -> tuple[bool, int | None]:
    """Is ``pid`` still the process that started at ``ticks``? With a pidfd held on it
    (opened first, so the answer cannot go stale by pid reuse) where there is one."""
    if not isinstance(pid, int) or not isinstance(ticks, (int, str)) or pid <= 0:
        return False, None
    pidfd = _open_pidfd(pid)
    # A zombie of our own (after a reexec, a worker that ended during the exec) is
    # still that worker: the reaper collects its real status.
    ours = clock.parent_of(pid) == os.getpid()
    if clock.start_time(pid, zombie=ours) == ticks:
        return True, pidfd
    if pidfd is not None:
        os.close(pidfd)
    return False, None


def make_plan(
    body: dict[str, Any] | None, supervisor: Supervisor, backend: Backend, mode: str
) -> Plan:
    """Decide what happens to each instance the previous daemon recorded. Blocking
    (reads /proc and cgroup.procs): call it in a thread, before anything is reaped."""
    plan = Plan(clock=backend.process_clock())
    if body is None:
        return plan
    plan.overrides = dict(body.get("overrides") or {})
    plan.reexec = body.get("reason") == "reexec" and body.get("daemon_pid") == os.getpid()
    same_boot = body.get("boot_id") is not None and body.get("boot_id") == plan.clock.boot_id()
    for name, trec in (body.get("tenants") or {}).items():
        tenant = supervisor.tenants.get(name)
        if tenant is not None and trec.get("operator") in ("started", "stopped"):
            plan.operator[name] = trec["operator"]
        by_leaf = {i.leaf: i for i in tenant.instances} if tenant is not None else {}
        for leaf, rec in (trec.get("instances") or {}).items():
            inst = by_leaf.get(leaf)
            if inst is not None and isinstance(rec.get("restarts"), int) and mode == "adopt":
                plan.restarts[(name, leaf)] = rec["restarts"]
            if inst is not None and isinstance(rec.get("exit_reason"), str):
                plan.reasons[(name, leaf)] = rec["exit_reason"]
            _plan_instance(plan, name, leaf, rec, inst, backend, mode, same_boot)
    return plan


def _plan_instance(
    plan: Plan,
    tenant: str,
    leaf: str,
    rec: dict[str, Any],
    inst: Instance | None,
    backend: Backend,
    mode: str,
    same_boot: bool,
) -> None:
    pid = rec.get("pid")
    if (
        inst is not None
        and mode == "adopt"
        and rec.get("state") == State.BACKOFF
        and isinstance(rec.get("backoff_until"), (int, float))
        and same_boot
    ):
        plan.backoff.append((tenant, leaf, float(rec["backoff_until"]) - time.monotonic()))
        return
    if pid is None or not same_boot:
        return
    alive, pidfd = _verify(pid, rec.get("ticks"), plan.clock)
    if alive and inst is not None:
        members = backend.leaf_members(inst.partition, leaf)
        if members is not None and pid not in members:
            # The kernel does not hold it in the worker's leaf: not ours to adopt.
            log.warning("recorded worker is not in its leaf; not adopted",
                        worker=f"{tenant}:{leaf}", pid=pid)  # fmt: skip
            if pidfd is not None:
                os.close(pidfd)
            alive, pidfd = False, None
    if not alive:
        if inst is not None and mode == "adopt" and rec.get("want_running"):
            plan.lost.append((tenant, leaf, pid))
        return
    adoptable = (
        inst is not None
        and mode == "adopt"
        # Being stopped when its daemon died: the stop is carried out, not undone.
        and bool(rec.get("want_running"))
        and rec.get("partition") == inst.partition
        and kind_of(inst) in ADOPTABLE_KINDS
        and rec.get("kind") in ADOPTABLE_KINDS
        and isinstance(rec.get("started_at"), (int, float))
    )
    if not adoptable or inst is None:
        plan.stop.append((pid, rec["ticks"]))
        if pidfd is not None:
            os.close(pidfd)
        return
    supervisor_def = rec.get("definition")
    plan.adopt.append(
        Adoptee(
            tenant=tenant,
            leaf=leaf,
            partition=inst.partition,
            pid=pid,
            ticks=rec["ticks"],
            started_at=float(rec["started_at"]),
            child=plan.clock.parent_of(pid) == os.getpid(),
            pidfd=pidfd,
            changed=supervisor_def != definition(_tenant_spec(inst), inst.spec),
            writer=rec.get("writer") if isinstance(rec.get("writer"), dict) else None,
        )
    )


def _tenant_spec(inst: Instance) -> TenantSpec:
    assert inst.owner is not None
    return inst.owner.spec


def stop_leftovers(plan: Plan) -> list[int]:
    """Stop the verified processes nobody adopts: SIGTERM to each one's group, SIGKILL
    after ``LEFTOVER_STOP_WAIT``. Only a process whose start time still matches is ever
    signalled. Blocking; returns the pids stopped."""
    clock = plan.clock
    targets = []
    for pid, ticks in plan.stop:
        alive, pidfd = _verify(pid, ticks, clock)
        if alive:
            targets.append((pid, ticks, pidfd))

    def send(target: tuple[int, int | str, int | None], sig: signal.Signals) -> None:
        pid, ticks, _ = target
        if clock.start_time(pid) == ticks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    term_then_kill(targets, send, lambda t: clock.start_time(t[0]) != t[1], LEFTOVER_STOP_WAIT)
    for _, _, pidfd in targets:
        if pidfd is not None:
            os.close(pidfd)
    return [pid for pid, _, _ in targets]


# -- applying it, once the supervisor runs -------------------------------------------


def gone_waiter(
    reaper: ChildReaper,
    pid: int,
    ticks: int | str,
    child: bool,
    pidfd: int | None,
    clock: Clock = LINUX,
) -> Callable[[], Awaitable[int | None]]:
    """How to wait for an adopted process's end: the reaper for a child, else its pidfd,
    else (no pidfd) its start time polled every ``POLL_INTERVAL`` seconds."""

    async def wait() -> int | None:
        if child:
            if pidfd is not None:
                os.close(pidfd)
            return await reaper.wait(pid)
        if pidfd is not None:
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            return None
        while True:
            # A clock that spawns a utility (pidin) reads in a thread, never in the loop.
            now = (
                clock.start_time(pid)
                if clock.cheap
                else await trio.to_thread.run_sync(clock.start_time, pid)
            )
            if now != ticks:
                return None
            await trio.sleep(POLL_INTERVAL)

    return wait


def reconnect_writer(
    log_dir: Path, tenant: str, leaf: str, rec: dict[str, Any], clock: Clock = LINUX
) -> tuple[logpipe.Writer, int | str, int | None] | None:
    """The adopted worker's log writer with a write end of its pipe again (for the
    run-end mark), or ``None`` (it is gone, or this platform cannot reopen a pipe).
    Blocking. Returns the writer, its start ticks and a pidfd on it."""
    pid, ticks, pipe = rec.get("pid"), rec.get("ticks"), rec.get("pipe")
    alive, pidfd = _verify(pid, ticks, clock)
    if not alive or not isinstance(pid, int) or not isinstance(ticks, (int, str)):
        return None
    fd = lock = -1
    try:
        fd = os.open(f"/proc/{pid}/fd/0", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode) or st.st_ino != pipe:
            raise OSError("the writer's input is no longer the worker's pipe")
        os.set_blocking(fd, True)
        dir_fd = logpipe.open_log_dir(log_dir, tenant)
        try:
            lock = os.open(
                logpipe.log_name(leaf) + ".lock",
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=dir_fd,
            )
        finally:
            os.close(dir_fd)
    except OSError as exc:
        for f in (fd, lock):
            if f >= 0:
                os.close(f)
        if pidfd is not None:
            os.close(pidfd)
        log.info("log writer not reconnected; the run's end will not be marked",
                 worker=f"{tenant}:{leaf}", writer=pid, error=str(exc))  # fmt: skip
        return None
    return logpipe.Writer(pid, fd, lock), ticks, pidfd


async def apply(
    plan: Plan,
    supervisor: Supervisor,
    backend: Backend,
    reaper: ChildReaper,
    nursery: trio.Nursery,
) -> list[Instance]:
    """Carry the plan out once the supervisor runs (before autostart). Returns the
    adopted instances whose definition changed: the caller restarts them."""
    for name, word in plan.operator.items():
        supervisor.tenants[name].operator = word
    by_name = {(i.tenant, i.leaf): i for t in supervisor.tenants.values() for i in t.instances}
    for key, restarts in plan.restarts.items():
        if key in by_name:
            by_name[key].lc.restarts = restarts
    for key, reason in plan.reasons.items():
        if key in by_name:  # how its last run ended, as `status` showed it
            by_name[key].lc.exit_reason = ExitReason.parse(reason)
    changed = []
    for a in plan.adopt:
        inst = by_name[(a.tenant, a.leaf)]
        await trio.to_thread.run_sync(backend.adopt_worker, a.partition, a.leaf, a.pid)
        inst.ticks = a.ticks
        if a.writer is not None:
            found = await trio.to_thread.run_sync(
                reconnect_writer, supervisor.log_dir, a.tenant, a.leaf, a.writer, plan.clock
            )
            if found is not None:
                writer, wticks, wfd = found
                inst.log_writer, inst.writer_ticks = writer, wticks
                nursery.start_soon(_watch_writer, writer, wticks, wfd, plan.clock)
        waiter = gone_waiter(reaper, a.pid, a.ticks, a.child, a.pidfd, plan.clock)
        a.pidfd = None  # the waiter owns it now
        supervisor.adopt_run(inst, a.pid, a.started_at, waiter)
        supervisor.adopted += 1
        log.info("adopted a running worker", worker=inst.name, pid=a.pid,
                 uptime=round(time.monotonic() - a.started_at, 3), child=a.child)  # fmt: skip
        if a.changed:
            changed.append(inst)
    for tenant, leaf, pid in plan.lost:
        inst = by_name[(tenant, leaf)]
        log.warning("worker lost while no daemon ran (gone, or its pid reused); "
                    "restarting it by its policy", worker=inst.name, pid=pid)  # fmt: skip
        supervisor.adopt_run(inst, pid, time.monotonic(), _already_gone)
    for tenant, leaf, delay in plan.backoff:
        supervisor.resume_backoff(by_name[(tenant, leaf)], delay)
    return changed


async def _already_gone() -> int | None:
    await trio.lowlevel.checkpoint()
    return None


async def _watch_writer(
    writer: logpipe.Writer, ticks: int | str, pidfd: int | None, clock: Clock
) -> None:
    """An adopted writer ends when its worker's output does; then a new run needs a new
    one (``Writer.done``). It may be our child (after a reexec): the reaper's orphan
    sweep collects it then."""
    await gone_waiter(ChildReaper(), writer.pid, ticks, False, pidfd, clock)()
    writer.done.set()
