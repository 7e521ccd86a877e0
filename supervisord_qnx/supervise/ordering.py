"""``after`` at run time: a start waits for the tenants it is after, a stop for the
tenants after it. The graph itself (and its config errors) is ``config/ordering.py``.

The rules, as docs/configuration.md states them to operators:

* ``after`` orders starts, it does not pull tenants in (systemd's ``After=``, not
  ``Requires=``). A start of ``x`` waits only for the tenants ``x`` is after that are
  *on their way up* when it looks (being started at the same time, by autostart, by
  another ``start``, by a ``restart`` or a crash loop's restart), until their every
  worker is ``running``. A tenant after one that is not on its way up (stopped by the
  operator, not autostarted) simply starts.
* If a tenant it waited for ends up not running (a worker ``fatal`` or ``exited``, or
  an operator stopped it meanwhile), the start gives up: its workers stay ``stopped``,
  a ``start-blocked`` event and log line say why, and a ``start`` call answers with
  ``AfterFailed`` (``invalid_state`` over the socket). The refusal carries down a
  chain: whatever was waiting for the refused tenant is refused too.
* Stopping many tenants together (shutdown, a reload removing tenants) stops each one
  only after every tenant of that set that is after it has stopped, and all the others
  at the same time: the shutdown of independent tenants takes one ``stop_timeout``,
  not their sum.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Protocol

import structlog
import trio

from supervisord_qnx.config.ordering import Ordering
from supervisord_qnx.exits import ExitReason
from supervisord_qnx.supervise.worker import State

log = structlog.get_logger("supervisord_qnx.ordering")

RUNNING_ONLY = frozenset({State.RUNNING})


class AfterFailed(Exception):
    """A start was given up because a tenant it waited for did not come up."""

    def __init__(self, tenant: str, after: str, why: str) -> None:
        self.tenant, self.after, self.why = tenant, after, why
        super().__init__(
            f"tenant {tenant!r} was not started: it starts after {after!r}, which did not "
            f"come up ({why}); start {after!r} first, or start {tenant!r} again to start "
            "it regardless"
        )


class Readiness(enum.Enum):
    READY = "ready"  # every worker running: dependents may start
    ON_ITS_WAY = "on-its-way"  # being started: dependents wait
    DOWN = "down"  # not running, and nobody is starting it


class Intent(Protocol):
    """The little the ordering reads of a lifecycle (``worker.Lifecycle``)."""

    want_running: bool
    exit_reason: ExitReason | None


class Member(Protocol):
    """The little the ordering reads of a worker instance (``supervisor.Instance``)."""

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> State: ...

    @property
    def lc(self) -> Intent: ...

    def settled_in(self, states: frozenset[State]) -> bool: ...


def readiness(starting: bool, members: Sequence[Member]) -> tuple[Readiness, str]:
    """Where a tenant is, for one that is after it: ``starting`` is true while a start
    of it is still waiting for its own ``after`` tenants. The text says why it is not
    ready (the first worker that is not running, and its last exit reason)."""
    if starting:
        return Readiness.ON_ITS_WAY, "waiting for its own 'after' tenants"
    down = [m for m in members if not m.settled_in(RUNNING_ONLY)]
    if not down:
        return Readiness.READY, "running"
    first = down[0]
    why = f"{first.name} is {first.state}"
    if first.lc.exit_reason is not None and first.state is not State.STOPPED:
        why += f": {first.lc.exit_reason}"
    if any(m.lc.want_running for m in down):
        return Readiness.ON_ITS_WAY, why
    return Readiness.DOWN, why


async def wait_for_after(
    tenant: str,
    after: Sequence[str],
    look: Callable[[str], tuple[Readiness, str]],
    changed: Callable[[str], trio.Event],
) -> None:
    """Return once every tenant of ``after`` that is on its way up runs; raise
    ``AfterFailed`` if one that was on its way up ends up down. ``look`` tells where a
    tenant is; ``changed(name)`` is an event set at that tenant's next change."""
    seen_on_its_way: set[str] = set()
    while True:
        blocker = None
        for dep in after:
            state, why = look(dep)
            if state is Readiness.ON_ITS_WAY:
                seen_on_its_way.add(dep)
                blocker = dep
                break
            if state is Readiness.DOWN and dep in seen_on_its_way:
                raise AfterFailed(tenant, dep, why)
        if blocker is None:
            # Every one is running, or down without anyone starting it (order only).
            return
        await changed(blocker).wait()


async def stop_in_reverse(
    ordering: Ordering, names: Sequence[str], stop: Callable[[str], Awaitable[object]]
) -> None:
    """Stop ``names`` together: each after every tenant of ``names`` that is after it,
    the rest concurrently. One nursery, one task per tenant; a stop that fails is
    logged and counts as done, so it holds up neither the tenants it is after nor any
    other (the failure boundary of the old one-after-another loop, kept)."""
    among: Collection[str] = frozenset(names)
    done = {name: trio.Event() for name in names}

    async def stop_one(name: str) -> None:
        try:
            for later in ordering.before(name, among):
                await done[later].wait()
            await stop(name)
        except Exception:  # one tenant's failure boundary
            log.exception("stopping a tenant failed; carrying on", tenant=name)
        finally:
            done[name].set()

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(stop_one, name)
