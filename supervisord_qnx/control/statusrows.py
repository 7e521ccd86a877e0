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
  scheduling; docs/realtime.md), that one kept for ``SCHED_MAX_AGE`` once a run is past
  its first second. The packed form of a ``sched`` map is remembered by what the
  kernel answered, since nearly every worker answers the same.
* **The syscalls run on the event loop, ``SCHED_STEP`` pids at a time**: three or
  four short syscalls per pid take about a microsecond, less than handing them to a
  thread, and a status call then does not wait for a slot of the slow-I/O pool behind
  ``logs`` or ``partitions`` (which showed as p99 while clients hammer ``status``).
  Between steps the call lets the loop run, so that one call never holds it for
  milliseconds (a step of 256 pids is about a quarter of one).

The result is ``rpc.Packed``: the server sends it as it is, with no second encoding.
``table`` (opt-in) answers the same rows as arrays under one list of column names,
each distinct ``sched`` form once (``tabulate``): at N = 1000 the maps' keys and the
repeated ``sched`` maps were 80 % of what a client spends decoding the reply.
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
# How old a worker's ``sched`` reading in ``status`` may be, in seconds. The three or
# four syscalls per live pid were a third of a status call's work at N = 1000 (issue
# 14); a worker's scheduling changes only when the worker (or root) changes it, so a
# client polling faster than this gets the kernel's answer of a moment ago, as ``top``
# shows what it read at its last refresh. A new run has a new pid: never an old
# reading. ``with_sched`` (``fields`` naming ``sched``) still reads at each call.
SCHED_MAX_AGE = 0.1
# A run's scheduling is applied by its exec shim between the spawn and the program's
# first instruction, while the run already shows as starting or running: readings are
# kept only once a run is this old (seconds), so a start is never shown with the
# settings of the moment before for the next SCHED_MAX_AGE.
SCHED_SETTLE = 1.0

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

# Every field a status row can have (docs/protocol.md), in the order rows hold them;
# ``fields`` picks among them, and they are the table form's columns when it names none.
TABLE_COLUMNS = (
    *OWN_FIELDS, "memory_denied", "status_text", "notify_socket", "notify_ignored", "job",
    "sched",
)  # fmt: skip
ROW_FIELDS = frozenset(TABLE_COLUMNS)
_UPTIME_AT = TABLE_COLUMNS.index("uptime")

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
    """Each live pid's scheduling as ``realtime.readback`` reports it, already packed;
    a reading is kept for ``max_age`` seconds (see ``SCHED_MAX_AGE``)."""

    def __init__(self, max_age: float = 0.0) -> None:
        self.max_age = max_age
        self._forms: dict[tuple[int, int, int, frozenset[int]], bytes] = {}
        # pid -> (when read, monotonic; its packed form)
        self._kept: dict[int, tuple[float, bytes]] = {}
        self._prune_at = 256

    def read(self, pids: list[int], now: float | None = None) -> dict[int, bytes]:
        """``pids``' forms: kept ones younger than ``max_age`` at ``now``, the rest read."""
        if now is None or self.max_age <= 0:
            return self._read(pids)
        kept, young = self._kept, now - self.max_age
        out: dict[int, bytes] = {}
        stale: list[int] = []
        for pid in pids:
            entry = kept.get(pid)
            if entry is not None and entry[0] > young:
                out[pid] = entry[1]
            else:
                stale.append(pid)
        if stale:
            fresh = self._read(stale)
            out.update(fresh)
            for pid, packed in fresh.items():
                if packed is not _NIL:  # a pid gone is asked again next time
                    kept[pid] = (now, packed)
            if len(kept) > self._prune_at:
                # Dead pids' readings (too old to be used again) go once the readings
                # have doubled since the last such sweep.
                self._kept = {p: e for p, e in kept.items() if e[0] > young}
                self._prune_at = 2 * len(self._kept) + 256
        return out

    def _read(self, pids: list[int]) -> dict[int, bytes]:
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
        # Each instance's kept row, for the maps (False) and for the table (True).
        self._rows: dict[bool, dict[Instance, Cached]] = {False: {}, True: {}}
        self.sched = SchedReader(SCHED_MAX_AGE)

    @staticmethod
    def _shown(inst: Instance, launcher: Launcher) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The values a row shows besides uptime and sched (its cache key), and the
        fields the launcher and the NOTIFY_SOCKET add to the instance's own."""
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
        return key, extra

    def _row(self, inst: Instance, launcher: Launcher, table: bool) -> Cached:
        """The instance's row bytes around ``uptime`` and ``sched`` (a map, or with
        ``table`` an array in ``TABLE_COLUMNS`` order), reused while the values they show
        are unchanged."""
        key, extra = self._shown(inst, launcher)
        kept = self._rows[table]
        cached = kept.get(inst)
        if cached is not None and cached[0] == key:
            return cached
        # Built from the same dict ``status`` answers without this cache, so the two
        # cannot drift apart: only the two live values are cut out.
        row = inst.as_dict(extra)
        cached = (key, *(_array_bytes(row) if table else _map_bytes(row)))
        kept[inst] = cached
        return cached

    async def _read_sched(
        self, instances: list[Instance], jobs: list[dict[str, Any]]
    ) -> dict[int, bytes]:
        """Every live pid's packed sched form, ``SCHED_STEP`` pids between checkpoints."""
        # Kept readings only for runs past their first moments (SCHED_SETTLE), the rest
        # (jobs too) read at each call.
        now = time.monotonic()
        settled = now - SCHED_SETTLE
        kept: list[int] = []
        fresh: list[int] = []
        for i in instances:
            lc = i.lc
            if lc.pid and lc.state in _LIVE:
                began = lc.started_at
                (kept if began is not None and began <= settled else fresh).append(lc.pid)
        fresh += [j["pid"] for j in jobs if j.get("pid") and j.get("state") in LIVE_STATES]
        step = max(1, SCHED_STEP)
        batches: list[tuple[list[int], float | None]]
        batches = [(kept[at : at + step], now) for at in range(0, len(kept), step)]
        batches += [(fresh[at : at + step], None) for at in range(0, len(fresh), step)]
        sched: dict[int, bytes] = {}
        for n, (pids, when) in enumerate(batches):
            if n:
                await trio.lowlevel.checkpoint()
            sched.update(self.sched.read(pids, when))
        return sched

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
        *,
        table: bool = False,
    ) -> Packed:
        """The ``status`` result for ``tenant`` (every tenant, and the jobs, for None):
        a list of maps, or with ``table`` the table form (``tabulate``)."""
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
        rows = [row(i, launcher, table) for i, launcher in zip(instances, launchers, strict=True)]
        kept = self._rows[table]
        if tenant is None and len(kept) > len(instances):
            # Instances a reload removed: forget their rows.
            self._rows[table] = {i: kept[i] for i in instances}
        sched = await self._read_sched(instances, jobs)
        now = time.monotonic()
        if table:
            return _table_reply(instances, rows, jobs, sched, now)
        parts = [_array_header(len(rows) + len(jobs))]
        _splice(parts, instances, rows, now, lambda pid: sched.get(pid, _NIL))
        for job in jobs:
            live_job = job.get("state") in LIVE_STATES
            job.pop("sched", None)  # re-added below as the last key, whatever the row held
            job["sched"] = None
            packed = pack_value(job)[:-1]  # without the None just added: spliced below
            parts.append(packed)
            parts.append(sched.get(job.get("pid"), _NIL) if live_job else _NIL)  # type: ignore[arg-type]
        return Packed(b"".join(parts))


def _map_bytes(row: dict[str, Any]) -> tuple[bytes, bytes]:
    """A row as a map: its key/value pairs before ``uptime``'s value (header included)
    and those after it, up to ``sched``'s value."""
    keys = list(row)
    at = keys.index("uptime")
    head = _map_header(len(row) + 1) + b"".join(
        pack_value(k) + pack_value(row[k]) for k in keys[:at]
    )
    tail = b"".join(pack_value(k) + pack_value(row[k]) for k in keys[at + 1 :])
    return head + _UPTIME, tail + _SCHED


def _array_bytes(row: dict[str, Any]) -> tuple[bytes, bytes]:
    """A row as the table form's array: its values in ``TABLE_COLUMNS`` order (nil for a
    field it has not) before ``uptime``'s and after it, up to ``sched``'s."""
    values = [pack_value(row.get(c)) for c in TABLE_COLUMNS[:-1]]
    head = _array_header(len(TABLE_COLUMNS)) + b"".join(values[:_UPTIME_AT])
    return head, b"".join(values[_UPTIME_AT + 1 :])


def _splice(
    parts: list[bytes],
    instances: list[Instance],
    rows: list[Cached],
    now: float,
    cell: Callable[[int], bytes],
) -> None:
    """Each instance's row onto ``parts``: its kept bytes around its uptime at ``now``
    and its sched cell (``cell(pid)``, for a live run; nil otherwise)."""
    float64, running = _FLOAT64.pack, State.RUNNING
    for inst, (_, head, tail) in zip(instances, rows, strict=True):
        lc = inst.lc
        state, began = lc.state, lc.started_at
        up = _NIL
        if began is not None and state is running:
            up = float64(0xCB, round(now - began, 3))
        live = state in _LIVE and lc.pid is not None
        parts += (head, up, tail, cell(lc.pid) if live else _NIL)  # type: ignore[arg-type]


_COLUMNS = msgpack.packb("columns")
_ROWS = msgpack.packb("rows")
_SCHEDS = msgpack.packb("sched")


class _Forms:
    """The table form's ``sched`` list: each distinct packed form once, and the packed
    index a row holds for it."""

    def __init__(self) -> None:
        self.index: dict[bytes, bytes] = {}

    def of(self, packed: bytes | None) -> bytes:
        if packed is None or packed == _NIL:
            return _NIL
        at = self.index.get(packed)
        if at is None:
            at = self.index[packed] = pack_value(len(self.index))
        return at

    def packed(self) -> bytes:
        return _array_header(len(self.index)) + b"".join(self.index)


def _table_reply(
    instances: list[Instance],
    rows: list[Cached],
    jobs: list[dict[str, Any]],
    sched: dict[int, bytes],
    now: float,
) -> Packed:
    """The table form of a full status reply (``tabulate``'s shape), from the rows' kept
    bytes: what ``StatusRows.reply`` splices, as arrays instead of maps."""
    forms = _Forms()
    parts = [
        _map_header(3) + _COLUMNS + pack_value(list(TABLE_COLUMNS)),
        _ROWS + _array_header(len(rows) + len(jobs)),
    ]
    form_of = forms.of
    _splice(parts, instances, rows, now, lambda pid: form_of(sched.get(pid)))
    for job in jobs:
        values = [pack_value(job.get(c)) for c in TABLE_COLUMNS[:-1]]
        live = job.get("state") in LIVE_STATES
        parts.append(_array_header(len(TABLE_COLUMNS)) + b"".join(values))
        parts.append(form_of(sched.get(job.get("pid") or 0)) if live else _NIL)
    parts.append(_SCHEDS + forms.packed())
    return Packed(b"".join(parts))


def tabulate(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, Any]:
    """Rows of ``status`` in the table form: ``{"columns": [...], "rows": [[...], ...],
    "sched": [...]}``; each row holds its values in the columns' order (nil for a field
    it has not), and its ``sched`` cell, if asked, is an index into ``sched`` (workers
    nearly all share a few forms) or nil (docs/protocol.md)."""
    out_rows = []
    forms: dict[tuple[Any, ...], int] = {}
    scheds: list[Any] = []
    at = columns.index("sched") if "sched" in columns else -1
    for r in rows:
        values = [r.get(c) for c in columns]
        if at >= 0:
            form = values[at]
            if form is not None:
                key = tuple(form.items())
                if key not in forms:
                    forms[key] = len(scheds)
                    scheds.append(form)
                values[at] = forms[key]
        out_rows.append(values)
    return {"columns": list(columns), "rows": out_rows, "sched": scheds}
