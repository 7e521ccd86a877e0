"""Who each worker runs as, and with which privileges (docs/security.md#tenants).

Resolves the config's ``user``/``group``/``supplementary_groups`` (a worker's over its
tenant's over ``[daemon] default_user``) to numbers, hands out dynamic uids, and builds
the ``ProcessSettings`` every spawn carries:

* a tenant without ``user`` runs as ``[daemon] default_user`` (``nobody``);
  ``user = "dynamic"`` (or ``default_user = "dynamic"``) gives the tenant a uid and gid
  of its own from ``[daemon] dynamic_uids``, like systemd's ``DynamicUser=``: the
  number is the tenant name's CRC-32 in the range, probing upwards past numbers that
  ``/etc/passwd``/``/etc/group`` or another tenant use, so it is stable across
  restarts while the set of tenants is;
* a ``memory-isolation`` tenant without ``user`` gets a dynamic uid too: the kernel
  lets a process read another's ``/proc/PID/mem`` and ``environ`` and signal it when
  both have the same uid, and an exec'd program is dumpable again, so a uid of its own
  is what separates its memory from every other tenant's;
* uid 0 only for a tenant with ``allow_root = true`` (else a config problem);
* ``no_new_privs`` always, the capability sets empty but for ``capabilities``, the
  tenant's ``umask`` and ``rlimits`` (``core`` = 0 unless it asks for cores, and always
  0 under ``memory-isolation``).

A daemon that is not root cannot switch users: its workers run as its own user, and
``--check`` says so (``identity_notes``). Reads the user and group databases
(``pwd``/``grp``): call it from the loader or a worker thread, not the event loop.
"""

from __future__ import annotations

import grp
import os
import pwd
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from supervisord_qnx.config.model import Config, DaemonSpec, TenantSpec, WorkerBase
from supervisord_qnx.partition import container, seccomp
from supervisord_qnx.partition.controls import Flag
from supervisord_qnx.partition.process import ProcessSettings

DYNAMIC = "dynamic"
#: What jobs (``supervisorctl-qnx run``) run as when ``default_user`` is dynamic.
JOB_FALLBACK_USER = "nobody"


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]
    user: str  # as shown by --check: "nobody (65534)", "dynamic (61200)"


class IdentityError(ValueError):
    """``key`` (as written in the tenant file) and the reason."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


def can_switch_users() -> bool:
    """Only root can run workers as other users."""
    return os.geteuid() == 0


def _flagged(config: Config, tenant: TenantSpec, flag: Flag) -> bool:
    if tenant.path in config.tree:
        node = config.tree[tenant.path]
        return any(flag in p.flags for p in (node, *node.ancestors()))
    return flag in tenant.flags


def memory_isolated(config: Config, tenant: TenantSpec) -> bool:
    return _flagged(config, tenant, Flag.MEMORY_ISOLATION)


def contained(config: Config, tenant: TenantSpec) -> bool:
    """The container flag, where this machine can give it (else the backend's
    enforcement says ``none``: strict refused the config, best-effort warned)."""
    return _flagged(config, tenant, Flag.CONTAINER) and container.unavailable() is None


def _wants_dynamic(config: Config, tenant: TenantSpec) -> bool:
    if tenant.user == DYNAMIC or any(w.user == DYNAMIC for w in tenant.worker):
        return True
    if tenant.user is None:
        return config.daemon.default_user == DYNAMIC or memory_isolated(config, tenant)
    return False


def _uid_taken(uid: int) -> bool:
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


# The last config's table: every spawn asks, and the answer changes only with the config
# (a reload makes a new Config object).
_last: tuple[Config, dict[str, int]] | None = None


def dynamic_uids(config: Config) -> dict[str, int]:
    """Tenant name -> its dynamic uid (and gid). ``IdentityError`` if the range is full."""
    global _last
    last = _last
    if last is not None and last[0] is config:
        return last[1]
    table = _allocate(config)
    _last = (config, table)
    return table


def _allocate(config: Config) -> dict[str, int]:
    lo, hi = config.daemon.dynamic_uids
    size = hi - lo + 1
    taken: set[int] = set()
    out: dict[str, int] = {}
    for tenant in sorted(config.tenants, key=lambda t: t.name):
        if not _wants_dynamic(config, tenant):
            continue
        start = zlib.crc32(tenant.name.encode()) % size
        for i in range(size):
            uid = lo + (start + i) % size
            if uid not in taken and not _uid_taken(uid):
                break
        else:
            raise IdentityError("user", f"no free uid left in dynamic_uids {lo}..{hi}")
        taken.add(uid)
        out[tenant.name] = uid
    return out


def _user(name: str, key: str) -> tuple[int, int, str]:
    """uid, primary gid and the name shown for a user name or number."""
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        if name.isdigit():  # a bare number need not be in /etc/passwd
            return int(name), int(name), name
        raise IdentityError(key, f"no such user: {name!r}") from None
    return entry.pw_uid, entry.pw_gid, f"{entry.pw_name} ({entry.pw_uid})"


def _group(name: str, key: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise IdentityError(key, f"no such group: {name!r}") from None


def resolve(
    config: Config,
    tenant: TenantSpec,
    worker: WorkerBase,
    index: int,
    dynamic: dict[str, int] | None = None,
) -> Identity:
    """The identity of one worker (``index``: its position, for error keys)."""
    where = f"worker[{index}]."
    user = worker.user if worker.user is not None else tenant.user
    user_key = f"{where}user" if worker.user is not None else "user"
    if user is None:
        user = config.daemon.default_user
        if user != DYNAMIC and memory_isolated(config, tenant):
            user = DYNAMIC
        user_key = "user" if user == DYNAMIC else "default_user"
    if user == DYNAMIC:
        table = dynamic if dynamic is not None else dynamic_uids(config)
        uid = gid = table[tenant.name]
        shown = f"dynamic ({uid})"
    else:
        uid, gid, shown = _user(user, user_key)
    if worker.group is not None:
        gid = _group(worker.group, f"{where}group")
    elif tenant.group is not None:
        gid = _group(tenant.group, "group")
    extra: Iterable[str] = (
        worker.supplementary_groups
        if worker.supplementary_groups is not None
        else tenant.supplementary_groups
    )
    key = (
        f"{where}supplementary_groups"
        if worker.supplementary_groups is not None
        else "supplementary_groups"
    )
    groups = tuple(_group(g, key) for g in extra)
    if uid == 0 and not tenant.allow_root:
        raise IdentityError(
            user_key,
            f"{shown} is root: a worker runs as root only with allow_root = true in its "
            "tenant file",
        )
    return Identity(uid, gid, groups, shown)


def problems(config: Config) -> list[tuple[str, str, str]]:
    """``(tenant name, key, reason)`` for every identity that does not resolve. Nothing
    when the daemon is not root: it cannot switch users, so names are not looked up."""
    if not can_switch_users():
        return []
    out: list[tuple[str, str, str]] = []
    try:
        dynamic = dynamic_uids(config)
    except IdentityError as exc:
        return [(t.name, exc.key, exc.reason) for t in config.tenants[:1]]
    for tenant in config.tenants:
        for i, worker in enumerate(tenant.worker):
            try:
                resolve(config, tenant, worker, i, dynamic)
            except IdentityError as exc:
                out.append((tenant.name, exc.key, exc.reason))
                break
    return out


def process_settings(
    config: Config, tenant: TenantSpec, worker: WorkerBase, index: int = 0
) -> ProcessSettings:
    """What a worker of ``tenant`` is started with. ``IdentityError`` if its user or a
    group vanished since the config was loaded."""
    isolated = memory_isolated(config, tenant)
    limits = tenant.rlimits
    common: dict[str, object] = {
        "no_new_privs": True,
        "umask": tenant.umask,
        "rlimit_nofile": limits.nofile,
        "rlimit_core": 0 if isolated else limits.core,
        "rlimit_nproc": limits.nproc,
        "rlimit_stack": limits.stack,
        "dumpable": not isolated,
    }
    if contained(config, tenant):
        common["container"] = True
        common["writable"] = tuple(str(p) for p in tenant.writable)
        common["network_none"] = tenant.network == "none"
    if tenant.seccomp != "none" and seccomp.unavailable() is None:
        common["seccomp"] = tenant.seccomp
    if not can_switch_users():
        return ProcessSettings(**common)  # type: ignore[arg-type]
    who = resolve(config, tenant, worker, index)
    return ProcessSettings(
        uid=who.uid,
        gid=who.gid,
        groups=who.groups,
        capabilities=tuple(tenant.capabilities),
        **common,  # type: ignore[arg-type]
    )


def job_settings(daemon: DaemonSpec) -> ProcessSettings:
    """What a one-off job runs as: ``default_user`` (``nobody`` if that is dynamic), no
    new privileges, no capabilities, umask 077, no core dumps."""
    common = {"no_new_privs": True, "umask": 0o077, "rlimit_core": 0}
    if not can_switch_users():
        return ProcessSettings(**common)  # type: ignore[arg-type]
    name = daemon.default_user if daemon.default_user != DYNAMIC else JOB_FALLBACK_USER
    uid, gid, _ = _user(name, "default_user")
    if uid == 0:
        raise IdentityError("default_user", "jobs never run as root")
    return ProcessSettings(uid=uid, gid=gid, groups=(), capabilities=(), **common)  # type: ignore[arg-type]


def describe(config: Config) -> dict[str, str]:
    """Tenant name -> who its workers run as, for ``--check``."""
    if not can_switch_users():
        me = os.geteuid()
        try:
            name = pwd.getpwuid(me).pw_name
        except KeyError:
            name = str(me)
        return {t.name: f"{name} ({me}), the daemon's own user" for t in config.tenants}
    out: dict[str, str] = {}
    try:
        dynamic = dynamic_uids(config)
    except IdentityError as exc:
        return {t.name: exc.reason for t in config.tenants}
    for tenant in config.tenants:
        shown = []
        for i, worker in enumerate(tenant.worker):
            try:
                who = resolve(config, tenant, worker, i, dynamic)
            except IdentityError as exc:
                shown.append(f"{worker.name}: {exc.reason}")
                continue
            text = who.user + (" [allow_root]" if who.uid == 0 else "")
            if worker.user is not None or worker.group is not None:
                text = f"{worker.name}: {text}"
            if text not in shown:
                shown.append(text)
        out[tenant.name] = "; ".join(shown)
    return out


def notes(config: Config) -> list[str]:
    """What ``--check`` warns about identities."""
    if can_switch_users():
        return []
    asked = [t.name for t in config.tenants if t.user or t.allow_root or t.capabilities]
    note = (
        "the daemon is not root: every worker runs as the daemon's own user (uid "
        f"{os.geteuid()}); user, group and capabilities are not applied"
    )
    if asked:
        note += f" (asked for by: {', '.join(asked)})"
    return [note]
