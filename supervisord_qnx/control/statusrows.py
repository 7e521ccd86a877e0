"""The ``status`` reply, packed row by row and reused while a row shows the same thing.

``status`` is the call operators and scripts poll, so its cost per worker is what
limits a daemon with many of them (docs/benchmarks.md, issue 14). The reply is the
one docs/protocol.md specifies, field for field and in the same order as
``Supervisor.status`` and ``with_sched`` give it; only the way it is built differs:

* **Each worker's row is kept packed.** A msgpack map is its header followed by its
  key/value pairs, so a row can be spliced from bytes: the pairs before ``uptime``
  (header included), ``uptime``'s value, the pairs after it, ``sched``'s value. The
  two byte runs are reused as long as every value they hold is the same: the cache key
  is those values themselves (state, pid, restarts, exit reason, partition, the
  launcher's and the NOTIFY_SOCKET's fields), read from the instance at each call. A
  key made of the values, not a version counter bumped at each place that changes a
  lifecycle, cannot miss a change someone adds later: a row is stale only if a shown
  value is left out of the key, and the tests compare every row with
  ``Supervisor.status``.
* **What changes with time is read at each call**: ``uptime`` from the run's start
  (one clock read per call), ``sched`` from the kernel (a program may change its own
  scheduling; docs/realtime.md). The packed form of a ``sched`` map is remembered by
  what the kernel answered, since nearly every worker answers the same.
* **The syscalls run on the event loop, ``SCHED_STEP`` pids at a time**: three or
  four short syscalls per pid take about a microsecond, less than handing them to a
  thread, and a status call then does not wait for a slot of the slow-I/O pool behind
  ``logs`` or ``partitions`` (which showed as p99 while clients hammer ``status``).
  Between steps the call lets the loop run, so that one call never holds it for
  milliseconds (a step of 256 pids is about a quarter of one).

The result is ``rpc.Packed``: the server sends it as it is, with no second encoding.
``fields`` (opt-in) answers only the fields named, as plain rows: a client that polls
``name`` and ``state`` of thousands of workers gets a fraction of the bytes, and no
``sched`` syscalls unless it asks for ``sched``.
Access is checked before the handler runs (``access.py``), so nothing here can widen
who sees what.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import trio

from supervisord_qnx.control.report import LIVE_STATES, with_sched
from supervisord_qnx.control.rpc import ErrorCode, Packed, RpcError, pack_value
from supervisord_qnx.partition.realtime import NAMES, RESET_ON_FORK, format_cpulist
from supervisord_qnx.supervise.launch import Launcher
from supervisord_qnx.supervise.supervisor import OWN_FIELDS, Instance, Supervisor
from supervisord_qnx.supervise.worker import State

# Live pids whose sched syscalls run between two checkpoints (see above).
SCHED_STEP = 256
# Distinct sched answers remembered packed; the kernel's answers are few in practice.
MAX_SCHED_FORMS = 1024

_NIL = b"\xc0"
# A float as msgpack packs Python's floats (float 64, big-endian), without a call to it.
_FLOAT64 = struct.Struct(">Bd")
_UPTIME = msgpack.packb("uptime")
_SCHED = msgpack.packb("sched")
_LIVE = frozenset(s for s in State if str(s) in LIVE_STATES)
# The real-time policies as sched_getscheduler answers them, with or without the
# reset-on-fork flag.
_RT_RAW = frozenset(
    code | flag for code in (os.SCHED_FIFO, os.SCHED_RR) for flag in (0, RESET_ON_FORK)
)

# Every field a status row can have (docs/protocol.md); ``fields`` picks among them.
ROW_FIELDS = frozenset(
    {"tenant", "worker", "instance", "name", "kind", "state", "pid", "partition", "restarts",
     "exit_reason", "uptime", "memory_denied", "status_text", "notify_socket",
     "notify_ignored", "sched", "job"}
)  # fmt: skip

Blocking = Callable[..., Awaitable[Any]]


def wanted_fields(value: list[Any]) -> list[str]:
    """The ``fields`` of a status request, checked: field names of a row, at least one. A
    misspelt name is ``bad_request`` (a script asking for ``stat`` should hear so)."""
    bad = [f for f in value if not isinstance(f, str) or f not in ROW_FIELDS]
    if bad or not value:
        raise RpcError(
            ErrorCode.BAD_REQUEST,
            f"parameter 'fields' must list field names of a status row "
            f"({', '.join(sorted(ROW_FIELDS))}); got {bad or 'none'}",
        )
    return list(dict.fromkeys(value))


def picked(rows: list[dict[str, Any]], fields: list[str]) -> list[dict[str, Any]]:
    """Only ``fields`` of each row, in that order; a field a row has not (``memory_denied``
    of a command worker) is left out of it, as in the full form."""
    return [{f: r[f] for f in fields if f in r} for r in rows]


# The values a row's cached bytes were made from, and those bytes (before and after
# uptime's value).
Cached = tuple[tuple[Any, ...], bytes, bytes]


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    return b"\xde" + n.to_bytes(2, "big")


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


class SchedReader:
    """Each live pid's scheduling as ``realtime.readback`` reports it, already packed."""

    def __init__(self) -> None:
        self._forms: dict[tuple[int, int, int, frozenset[int]], bytes] = {}

    def read(self, pids: list[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        forms = self._forms
        for pid in pids:
            try:
                raw = os.sched_getscheduler(pid)
                # sched(7): the static priority is 0 under every policy but the real-time
                # ones, so only those are asked (a quarter of this loop's syscalls).
                priority = os.sched_getparam(pid).sched_priority if raw in _RT_RAW else 0
                cpus = frozenset(os.sched_getaffinity(pid))
                nice = os.getpriority(os.PRIO_PROCESS, pid)
            except (ProcessLookupError, PermissionError):
                out[pid] = _NIL
                continue
            key = (raw, priority, nice, cpus)
            packed = forms.get(key)
            if packed is None:
                policy = raw & ~RESET_ON_FORK
                packed = pack_value(
                    {
                        "policy": NAMES.get(policy, str(policy)),
                        "priority": priority,
                        "nice": nice,
                        "cpus": format_cpulist(cpus),
                    }
                )
                if len(forms) >= MAX_SCHED_FORMS:
                    forms.clear()
                forms[key] = packed
            out[pid] = packed
        return out


class StatusRows:
    """Builds ``status`` replies; one per daemon (its caches live as long)."""

    def __init__(self) -> None:
        self._rows: dict[Instance, Cached] = {}
        self.sched = SchedReader()

    def _row(self, inst: Instance, launcher: Launcher) -> Cached:
        """The instance's row bytes around ``uptime`` and ``sched``, reused while the
        values they show are unchanged."""
        lc = inst.lc
        extra = launcher.status_fields(inst.target)
        note = inst.notify
        extra["status_text"] = None if note is None else note.status_text
        if note is not None:
            extra.update(note.fields())
        key = (
            lc.state,
            lc.pid,
            lc.restarts,
            lc.exit_reason,
            inst.tenant,
            inst.partition,
            inst.spec,
            inst.index,
            tuple(extra.items()),
        )
        cached = self._rows.get(inst)
        if cached is not None and cached[0] == key:
            return cached
        # Built from the same dict ``status`` answers without this cache, so the two
        # cannot drift apart: only the two live values are cut out.
        row = inst.as_dict(extra)
        keys = list(row)
        at = keys.index("uptime")
        head = _map_header(len(row) + 1) + b"".join(
            pack_value(k) + pack_value(row[k]) for k in keys[:at]
        )
        tail = b"".join(pack_value(k) + pack_value(row[k]) for k in keys[at + 1 :])
        cached = (key, head + _UPTIME, tail + _SCHED)
        self._rows[inst] = cached
        return cached

    async def reply_fields(
        self,
        sup: Supervisor,
        tenant: str | None,
        jobs: list[dict[str, Any]],
        fields: list[str],
        blocking: Blocking,
    ) -> list[dict[str, Any]]:
        """The opt-in compact form: only ``fields`` of each row, built as dicts (a few
        fields are small to encode), and the kernel asked for ``sched`` only if wanted.
        Fields an instance holds itself (``OWN_FIELDS``: name, state, pid, ...) are read
        alone, without the whole row: what a script polling thousands of workers asks."""
        if OWN_FIELDS.keys() >= set(fields):
            tenants = [sup.tenant(tenant)] if tenant is not None else sup.tenants.values()
            now = time.monotonic()
            getters = [(f, OWN_FIELDS[f]) for f in fields]
            own = [{f: get(i, now) for f, get in getters} for t in tenants for i in t.instances]
            return own + picked(jobs, fields)
        rows = sup.status(tenant) + jobs
        if "sched" in fields:
            await with_sched(rows, blocking)
        return picked(rows, fields)

    async def reply(
        self,
        sup: Supervisor,
        tenant: str | None,
        jobs: list[dict[str, Any]],
    ) -> Packed:
        """The ``status`` result for ``tenant`` (every tenant, and the jobs, for None)."""
        tenants = [sup.tenant(tenant)] if tenant is not None else list(sup.tenants.values())
        instances = [i for t in tenants for i in t.instances]
        for_spec = sup.launchers.for_spec
        # The launcher depends on the spec's class only; an isinstance check against a
        # pydantic model per worker was 3 % of a status call at N = 100.
        by_kind: dict[type, Launcher] = {}
        launchers = [
            by_kind.get(type(i.spec)) or by_kind.setdefault(type(i.spec), for_spec(i.spec))
            for i in instances
        ]
        # What a launcher reads from its running workers (wasm: memory.grow denials) is
        # refreshed first, as Supervisor.refresh_counters does: its status_fields show it.
        for inst, launcher in zip(instances, launchers, strict=True):
            if launcher.reports_counters and inst.lc.state is State.RUNNING:
                await launcher.refresh(inst.target)
        row = self._row
        rows = [row(inst, launcher) for inst, launcher in zip(instances, launchers, strict=True)]
        if tenant is None and len(self._rows) > len(instances):
            # Instances a reload removed: forget their rows.
            self._rows = {i: self._rows[i] for i in instances}
        live = [i.lc.pid for i in instances if i.lc.pid and i.lc.state in _LIVE]
        live += [j["pid"] for j in jobs if j.get("pid") and j.get("state") in LIVE_STATES]
        step = max(1, SCHED_STEP)
        sched = self.sched.read(live[:step])
        for at in range(step, len(live), step):
            await trio.lowlevel.checkpoint()
            sched.update(self.sched.read(live[at : at + step]))
        now = time.monotonic()
        parts = [_array_header(len(rows) + len(jobs))]
        float64, sched_of, running = _FLOAT64.pack, sched.get, State.RUNNING
        for inst, (_, head, tail) in zip(instances, rows, strict=True):
            lc = inst.lc
            state, began = lc.state, lc.started_at
            up = _NIL
            if began is not None and state is running:
                up = float64(0xCB, round(now - began, 3))
            parts += (head, up, tail, sched_of(lc.pid, _NIL) if state in _LIVE else _NIL)  # type: ignore[arg-type]
        for job in jobs:
            live_job = job.get("state") in LIVE_STATES
            job.pop("sched", None)  # re-added below as the last key, whatever the row held
            job["sched"] = None
            packed = pack_value(job)[:-1]  # without the None just added: spliced below
            parts.append(packed)
            parts.append(sched.get(job.get("pid"), _NIL) if live_job else _NIL)  # type: ignore[arg-type]
        return Packed(b"".join(parts))
