"""The runtime state's ``tenants`` part, kept as canonical JSON text row by row.

The runtime state (``state.py``) is written after every change, and its body is taken
on the event loop so that it is consistent. Built whole each time, the body of 1,000
workers was 19-27 ms of the loop (a dict per worker, an ``fstat`` of each log pipe, one
JSON encoding of 300 KB), made again every few tens of milliseconds while workers
restart: a worker's restart or a ``status`` call that fell into it waited for it, which
made the restart after a SIGKILL slower at N = 1000 than at N = 100 (issue 14).

Here each worker instance's entry is kept as the text ``json.dumps`` gives it (sorted
keys, no spaces: the canonical form whose SHA-256 the file carries), and made again only
when a value it shows changed. As in ``control/statusrows.py``, the cache key is those
values themselves, read from the instance at each write, not a version counter bumped
wherever a lifecycle changes: a new field can only go stale if it is left out of the
key, and the tests compare the text with a whole encoding of ``adopt.snapshot``. What a
write still does per worker is reading a dozen attributes and comparing a tuple.

The coalesced writes take it in steps of ``STEP`` tenants, the loop free between them
(``tenants_in_steps``): what remains per write at N = 1000 (a couple of milliseconds)
then delays a restart's next step or a status answer by one step at most. The final
writes (reexec, shutdown) take it in one go.

Each key holds the instance's specs (a fingerprint of them is in the entry); the cache
is rebuilt at each write from the instances there are now, so the specs a reload
replaced are let go at the next write, never kept (the leak ``adopt.definition``
describes).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from supervisord_qnx.config.model import TenantSpec, WorkerBase
from supervisord_qnx.supervise import adopt
from supervisord_qnx.supervise.state import Raw, dumps
from supervisord_qnx.supervise.supervisor import Instance, Supervisor
from supervisord_qnx.supervise.worker import State

# An instance's entry: the values it shows, its specs and their fingerprint, its text,
# its leaf.
Entry = tuple[tuple[Any, ...], TenantSpec, WorkerBase, str, str, str]
_BACKOFF = State.BACKOFF
# Tenants per step of a snapshot taken in steps: about a quarter of a millisecond each.
STEP = 128


class StateBody:
    """One per daemon: builds the state body's ``tenants`` as a ``Raw`` text."""

    def __init__(self) -> None:
        self._entries: dict[Instance, Entry] = {}
        # Each tenant's whole text, by its operator word and the texts of its entries.
        self._tenants: dict[str, tuple[tuple[Any, ...], str]] = {}
        self.rebuilt = 0  # entries made again (the tests read it)

    def tenants(self, supervisor: Supervisor) -> Raw:
        """The text ``dumps`` gives of ``adopt.snapshot(...)["tenants"]``."""
        names = sorted(supervisor.tenants)
        parts: list[str] = []
        entries: dict[Instance, Entry] = {}
        texts: dict[str, tuple[tuple[Any, ...], str]] = {}
        self._some(supervisor, names, parts, entries, texts)
        self._entries, self._tenants = entries, texts
        return Raw("{" + ",".join(parts) + "}")

    async def tenants_in_steps(
        self, supervisor: Supervisor, pause: Callable[[], Awaitable[None]]
    ) -> Raw:
        """``tenants``, ``STEP`` tenants at a time with ``await pause()`` between: a
        restart's next step or a status answer waits for one step, not for all. Each
        tenant is read within one step, so its entry is consistent; one changed (or
        added, or removed) after its step is written by the next write, which its change
        asked for."""
        names = sorted(supervisor.tenants)
        parts: list[str] = []
        entries: dict[Instance, Entry] = {}
        texts: dict[str, tuple[tuple[Any, ...], str]] = {}
        for at in range(0, len(names), STEP):
            if at:
                await pause()
            self._some(supervisor, names[at : at + STEP], parts, entries, texts)
        self._entries, self._tenants = entries, texts
        return Raw("{" + ",".join(parts) + "}")

    def _some(
        self,
        supervisor: Supervisor,
        names: list[str],
        parts: list[str],
        entries: dict[Instance, Entry],
        tenant_texts: dict[str, tuple[tuple[Any, ...], str]],
    ) -> None:
        old_get, entry_of = self._entries.get, self._entry
        old_tenants = self._tenants
        tenants = supervisor.tenants
        for name in names:
            tenant = tenants.get(name)
            if tenant is None:
                continue  # removed by a reload during an earlier step
            spec = tenant.spec
            mine = []
            for inst in tenant.instances:
                entry = entries[inst] = entry_of(inst, spec, old_get(inst))
                mine.append(entry)
            if len(mine) > 1:
                # Sorted by leaf, as sort_keys orders them; a later instance of the same
                # leaf wins, as it did in the dict the whole encoding was made from.
                by_leaf = {e[5]: e for e in mine}
                mine = [by_leaf[leaf] for leaf in sorted(by_leaf)]
            # The same entries (compared by identity first) and operator word: same text.
            key = (tenant.operator, *mine)
            known = old_tenants.get(name)
            if known is None or known[0] != key:
                text = (
                    dumps(name)
                    + ':{"instances":{'
                    + ",".join(e[4] for e in mine)
                    + '},"operator":'
                    + dumps(tenant.operator)
                    + "}"
                )
                known = (key, text)
            tenant_texts[name] = known
            parts.append(known[1])

    def _entry(self, inst: Instance, tenant: TenantSpec, known: Entry | None) -> Entry:
        lc = inst.lc
        state = lc.state
        writer = inst.log_writer
        if writer is not None and (writer.fd < 0 or writer.done.is_set()):
            writer = None
        key = (
            state,
            lc.want_running,
            lc.pid,
            inst.ticks,
            lc.started_at,
            lc.restarts,
            lc.deadline if state is _BACKOFF else None,
            lc.exit_reason,
            inst.partition,
            inst.index,
            # The writer's pid and pipe are fixed while it is the same object with the
            # same fd (``Writer.close`` sets the fd to -1).
            writer,
            None if writer is None else writer.fd,
            inst.writer_ticks,
        )
        if known is not None and known[0] == key and known[1] is tenant and known[2] is inst.spec:
            return known
        self.rebuilt += 1
        if known is not None and known[1] is tenant and known[2] is inst.spec:
            fingerprint = known[3]
        else:
            fingerprint = adopt.definition(tenant, inst.spec)
        record = adopt.instance_record(inst, fingerprint)
        leaf = inst.leaf
        return (key, tenant, inst.spec, fingerprint, dumps(leaf) + ":" + dumps(record), leaf)


def snapshot(body: StateBody, supervisor: Supervisor, overrides: dict[str, Any]) -> dict[str, Any]:
    """``adopt.snapshot``'s body, with its ``tenants`` from ``body``'s kept texts."""
    out = adopt.snapshot_head(supervisor, overrides)
    out["tenants"] = body.tenants(supervisor)
    return out


async def snapshot_in_steps(
    body: StateBody,
    supervisor: Supervisor,
    overrides: Callable[[], dict[str, Any]],
    pause: Callable[[], Awaitable[None]],
) -> dict[str, Any]:
    """``snapshot`` in steps (``StateBody.tenants_in_steps``); the head and the
    overrides are read after the last step, in one go."""
    tenants = await body.tenants_in_steps(supervisor, pause)
    out = adopt.snapshot_head(supervisor, overrides())
    out["tenants"] = tenants
    return out
