"""Who may do what on the control socket: roles from peer credentials, one table of
methods.

The kernel tells the daemon who is on the other end of each connection (the peer's
uid, gid, supplementary groups and pid, read at accept: ``server.py``). That identity
is mapped to a **role** through the ``[[control.grant]]`` tables of the daemon config,
and each request is checked against :data:`METHOD_ACCESS` before its handler runs:

* ``admin`` may call every method. Root and the daemon's own uid are always admin
  (they could take over the daemon anyway: signals, ptrace, its files).
* ``operator`` may call the read methods, and the tenant methods (``start``, ``stop``,
  ``restart``, ``logs``, ``run``, ``job``, ``set``) on the tenants its grants list;
  a tenant method that names no tenant of the operator's is refused.
* ``viewer`` may call the read methods only.
* a peer that no grant names has no role and may call nothing.

Grants add up: a peer named by several grants has the highest role among them, and an
operator the union of their tenants. A refused request is answered ``permission_denied``
naming the method (and the tenant) and is logged with the peer's uid and pid.

Why one table: a method added without a row is admin-only (the safe default), and a
test checks that every served method has a row, so nobody widens access by accident.
The table is printed in docs/security.md.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog

from supervisord_qnx import userdb
from supervisord_qnx.config.model import Config, ControlSpec
from supervisord_qnx.control.peercred import PeerCredentials
from supervisord_qnx.control.rpc import ErrorCode, RpcError

log = structlog.get_logger("supervisord_qnx.control")


class Role(enum.IntEnum):
    """Ordered: a higher role may do everything a lower one may."""

    NONE = 0
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return "no role" if self is Role.NONE else self.name.lower()


class Access(enum.Enum):
    """What a method needs."""

    READ = "viewer"  # viewer, operator, admin: it changes nothing and shows no output
    TENANT = "operator"  # operator of the tenant concerned, or admin
    ADMIN = "admin"  # admin only


# The one table. READ methods change nothing and show no tenant's output (logs and job
# output are a tenant's data: TENANT). ``subscribe``/``unsubscribe`` are the live form of
# ``events``. A served method missing here is admin-only.
METHOD_ACCESS: Final[Mapping[str, Access]] = {
    "ping": Access.READ,
    "version": Access.READ,
    "status": Access.READ,
    "partitions": Access.READ,
    "events": Access.READ,
    "subscribe": Access.READ,
    "unsubscribe": Access.READ,
    "metrics": Access.READ,
    "start": Access.TENANT,
    "stop": Access.TENANT,
    "restart": Access.TENANT,
    "logs": Access.TENANT,
    "run": Access.TENANT,
    "job": Access.TENANT,
    "set": Access.TENANT,
    "attach": Access.ADMIN,
    "detach": Access.ADMIN,
    "reload": Access.ADMIN,
    "shutdown": Access.ADMIN,
    "reexec": Access.ADMIN,
}


@dataclass(frozen=True, slots=True)
class Standing:
    """A peer's role, and for an operator the tenants it may act on."""

    role: Role
    tenants: frozenset[str] = frozenset()


def standing(
    control: ControlSpec, uid: int, groups: frozenset[int], *, daemon_uid: int | None = None
) -> Standing:
    """The role the grants give a peer with ``uid`` and ``groups``."""
    if uid == 0 or uid == (os.geteuid() if daemon_uid is None else daemon_uid):
        return Standing(Role.ADMIN)
    role, tenants = Role.NONE, set[str]()
    for grant in control.grant:
        uids = {userdb.uid_of(u) for u in grant.uids}
        gids = {userdb.gid_of(g) for g in grant.groups}
        if uid not in uids and not groups & gids:
            continue
        granted = Role[grant.role.upper()]
        role = max(role, granted)
        if granted is Role.OPERATOR:
            tenants.update(grant.tenants)
    return Standing(role, frozenset(tenants) if role is Role.OPERATOR else frozenset())


def peer_groups(peer: PeerCredentials) -> frozenset[int]:
    """The peer's groups: those its process had at connect (primary and, where the
    kernel reports them, supplementary) and those the user database gives its uid."""
    return frozenset({peer.gid, *peer.groups}) | userdb.groups_of_uid(peer.uid, peer.gid)


def tenant_of_partition(path: str, tenant_paths: Mapping[str, str]) -> str | None:
    """The tenant whose partition ``path`` is, or is inside (a job's partition)."""
    path = path.strip("/")
    for name, tpath in tenant_paths.items():
        if path == tpath or path.startswith(tpath + "/"):
            return name
    return None


class Authorizer:
    """Checks each request of a connection against its peer's standing.

    ``config`` and ``job_partition`` are asked at call time: a reload changes the
    grants, and jobs come and go. An unknown peer (a platform that reports no
    credentials) counts as the daemon's own user only when the socket's mode lets no
    one else connect; otherwise it has no role.
    """

    def __init__(
        self,
        config: Callable[[], Config],
        job_partition: Callable[[int], str | None],
    ) -> None:
        self._config = config
        self._job_partition = job_partition
        self._cache_for: tuple[Config, PeerCredentials] | None = None
        self._cached = Standing(Role.NONE)

    def standing_of(self, peer: PeerCredentials | None) -> Standing:
        config = self._config()
        if peer is None:
            private = config.daemon.socket_mode & 0o077 == 0
            return Standing(Role.ADMIN if private else Role.NONE)
        # Requests come in runs from one connection: remember the last answer.
        # By identity for the config: comparing two configs field by field is not cheap.
        cached = self._cache_for
        if cached is None or cached[0] is not config or cached[1] != peer:
            self._cached = standing(config.control, peer.uid, peer_groups(peer))
            self._cache_for = (config, peer)
        return self._cached

    def check(self, method: str, params: Mapping[str, Any], peer: PeerCredentials | None) -> None:
        """Return if ``peer`` may call ``method`` with ``params``; raise
        ``permission_denied`` (and log it) if not."""
        need = METHOD_ACCESS.get(method, Access.ADMIN)
        st = self.standing_of(peer)
        if st.role is Role.ADMIN:
            return
        if need is Access.READ and st.role >= Role.VIEWER:
            return
        tenant = self._tenant_of(method, params) if need is Access.TENANT else None
        if st.role is Role.OPERATOR and tenant is not None and tenant in st.tenants:
            return
        self._deny(method, tenant, need, st, peer)

    def _tenant_of(self, method: str, params: Mapping[str, Any]) -> str | None:
        """The tenant a tenant method's request is about (``None``: none can be told)."""
        if method in ("start", "stop", "restart", "logs"):
            tenant = params.get("tenant")
            return tenant if isinstance(tenant, str) else None
        paths = {t.name: t.path for t in self._config().tenants}
        if method in ("run", "set"):
            partition = params.get("partition")
            return tenant_of_partition(partition, paths) if isinstance(partition, str) else None
        if method == "job":
            job_id = params.get("id")
            if not isinstance(job_id, int) or isinstance(job_id, bool):
                return None
            partition = self._job_partition(job_id)
            return tenant_of_partition(partition, paths) if partition else None
        return None

    def _deny(
        self,
        method: str,
        tenant: str | None,
        need: Access,
        st: Standing,
        peer: PeerCredentials | None,
    ) -> None:
        uid = peer.uid if peer else None
        pid = peer.pid if peer else None
        log.warning(
            "control request denied",
            method=method,
            tenant=tenant,
            peer_uid=uid,
            peer_pid=pid,
            role=st.role.label,
        )
        who = f"uid {uid}" if uid is not None else "this peer"
        if st.role is Role.NONE:
            why = f"{who} has no role on this daemon (no [[control.grant]] names it)"
        elif need is Access.ADMIN:
            why = f"{who} is {st.role.label}; {method} needs admin"
        elif st.role is Role.VIEWER:
            why = f"{who} is viewer; {method} needs operator of the tenant, or admin"
        elif tenant is None:
            why = f"{who} is operator, and this {method} names no tenant of its grants"
        else:
            why = f"{who} is operator of {', '.join(sorted(st.tenants))}, not of {tenant!r}"
        what = f"{method} of tenant {tenant!r}" if tenant else method
        raise RpcError(
            ErrorCode.PERMISSION_DENIED,
            f"permission denied: {what}: {why}",
            method=method,
            **({"tenant": tenant} if tenant else {}),
        )
