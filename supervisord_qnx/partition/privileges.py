"""Identity and privileges of a worker process (issue 13; docs/security.md#tenants).

Two ways in, one result (see ``process.py``):

* ``wrappers(settings)``: exec wrappers for processes started by ``exec``. A
  ``/bin/sh`` sets the umask and the resource limits (builtins, soft = hard, while
  still privileged, so that a limit above the daemon's own hard one can be set), then
  execs util-linux ``setpriv``, which switches uid, gid and groups, sets
  ``no_new_privs`` and leaves only the listed capabilities in the bounding,
  inheritable and ambient sets, then execs the program. Two ``exec``s and no
  interpreter: the spawn stays cheap (docs/security.md gives the measured cost).
* ``apply_self(settings)``: the same, done by a process to itself with ``os``,
  ``resource`` and ``prctl``/``capset`` through ``ctypes`` (the wasm fork server's
  children, which are never exec'd).

It imports only ``container`` (a leaf), so the config model can take its capability
names from here.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import sys
from typing import Protocol

from supervisord_qnx.partition import container, seccomp

#: Linux capability names and numbers (linux/capability.h).
CAPABILITIES: dict[str, int] = {
    name: number
    for number, name in enumerate(
        [
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_LINUX_IMMUTABLE",
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST",
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_IPC_LOCK",
            "CAP_IPC_OWNER",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_CHROOT",
            "CAP_SYS_PTRACE",
            "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN",
            "CAP_SYS_BOOT",
            "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE",
            "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG",
            "CAP_MKNOD",
            "CAP_LEASE",
            "CAP_AUDIT_WRITE",
            "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP",
            "CAP_MAC_OVERRIDE",
            "CAP_MAC_ADMIN",
            "CAP_SYSLOG",
            "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND",
            "CAP_AUDIT_READ",
            "CAP_PERFMON",
            "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE",
        ]
    )
}

SETPRIV = "setpriv"

# prctl(2) options
_PR_SET_DUMPABLE = 4
_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_VERSION_3 = 0x20080522


class Settings(Protocol):
    """The fields of ``process.ProcessSettings`` this module reads."""

    @property
    def uid(self) -> int | None: ...
    @property
    def gid(self) -> int | None: ...
    @property
    def groups(self) -> tuple[int, ...] | None: ...
    @property
    def no_new_privs(self) -> bool: ...
    @property
    def capabilities(self) -> tuple[str, ...] | None: ...
    @property
    def umask(self) -> int | None: ...
    @property
    def rlimit_nofile(self) -> int | None: ...
    @property
    def rlimit_core(self) -> int | None: ...
    @property
    def rlimit_nproc(self) -> int | None: ...
    @property
    def rlimit_stack(self) -> int | None: ...
    @property
    def dumpable(self) -> bool: ...
    @property
    def container(self) -> bool: ...
    @property
    def writable(self) -> tuple[str, ...]: ...
    @property
    def network_none(self) -> bool: ...
    @property
    def seccomp(self) -> str: ...


def rlimits(s: Settings) -> list[tuple[int, int]]:
    """``(resource, value)`` for each limit set, ``RLIM_INFINITY`` for -1."""
    out = []
    for res, value in (
        (resource.RLIMIT_NOFILE, s.rlimit_nofile),
        (resource.RLIMIT_CORE, s.rlimit_core),
        (resource.RLIMIT_NPROC, s.rlimit_nproc),
        (resource.RLIMIT_STACK, s.rlimit_stack),
    ):
        if value is not None:
            out.append((res, resource.RLIM_INFINITY if value < 0 else value))
    return out


# The shell builtin for each limit and the unit it counts in (dash, ksh: -p is processes).
_ULIMIT = {
    resource.RLIMIT_NOFILE: ("-n", 1),
    resource.RLIMIT_CORE: ("-c", 512),
    resource.RLIMIT_NPROC: ("-p", 1),
    resource.RLIMIT_STACK: ("-s", 1024),
}


def _caps_arg(names: tuple[str, ...]) -> str:
    return ",".join(["-all", *(f"+{n.removeprefix('CAP_').lower()}" for n in names)])


def wrappers(s: Settings) -> list[str]:
    """The exec wrappers (argv prefix) that apply ``s``'s identity and privileges."""
    out: list[str] = []
    steps = []
    if s.umask is not None:
        steps.append(f"umask {s.umask:04o}")
    for res, value in rlimits(s):
        flag, unit = _ULIMIT[res]
        shown = "unlimited" if value == resource.RLIM_INFINITY else str(value // unit)
        steps.append(f"ulimit {flag} {shown}")
    if steps:
        out += ["/bin/sh", "-c", " && ".join([*steps, 'exec "$@"']), "sh"]
    if s.container:
        # Namespaces and mounts need root: before the privilege drop.
        out += container.wrappers(tuple(s.writable), s.network_none)
    if s.seccomp:
        # After the namespaces (the filter denies mount and unshare), before setpriv (as
        # the daemon's user, who can read the interpreter that loads it; setpriv's own
        # calls are not on the list).
        out += seccomp.wrapper(s.seccomp)
    priv: list[str] = []
    if s.gid is not None:
        priv += ["--regid", str(s.gid)]
    if s.groups is not None:
        priv += ["--groups", ",".join(map(str, s.groups))] if s.groups else ["--clear-groups"]
    if s.uid is not None:
        priv += ["--reuid", str(s.uid)]
    if s.no_new_privs:
        priv.append("--no-new-privs")
    if s.capabilities is not None:
        caps = _caps_arg(s.capabilities)
        priv += ["--bounding-set", caps, "--inh-caps", caps, "--ambient-caps", caps]
    if priv:
        out += [setpriv_path(), *priv, "--"]
    return out


def setpriv_path() -> str:
    """util-linux ``setpriv``, by absolute path (the worker's PATH is the tenant's)."""
    return shutil.which(SETPRIV, path="/usr/bin:/bin:/usr/sbin:/sbin") or SETPRIV


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(libc: ctypes.CDLL, *args: int) -> None:
    if libc.prctl(*(ctypes.c_ulong(a) for a in args), *[ctypes.c_ulong(0)] * (5 - len(args))) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl{args}: {os.strerror(err)}")


def _capset(libc: ctypes.CDLL, mask: int) -> None:
    """Permitted = effective = inheritable = ``mask`` for the calling thread."""
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    lo, hi = mask & 0xFFFFFFFF, mask >> 32
    data = (ctypes.c_uint32 * 6)(lo, lo, lo, hi, hi, hi)
    if libc.capset(header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _drop_capabilities(libc: ctypes.CDLL, wanted: set[int]) -> None:
    """Before the uid switch: bounding set and ambient set down to ``wanted``."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if cap not in wanted:
            _prctl(libc, _PR_CAPBSET_DROP, cap)
    _prctl(libc, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    if wanted:
        # Keep the listed ones across the uid switch.
        _prctl(libc, _PR_SET_KEEPCAPS, 1)


def _switch_identity(s: Settings) -> None:
    if s.groups is not None:
        os.setgroups(list(s.groups))
    if s.gid is not None:
        os.setresgid(s.gid, s.gid, s.gid)
    if s.uid is not None:
        os.setresuid(s.uid, s.uid, s.uid)


def apply_self(s: Settings) -> None:
    """Apply ``s`` to the calling (single-threaded) process; ``OSError`` if a step fails.

    On a system without ``prctl`` (QNX) only the identity, umask and limits apply."""
    if s.container:
        raise OSError("a container worker is started by exec (unshare), not in-process")
    if s.umask is not None:
        os.umask(s.umask)
    for res, value in rlimits(s):
        resource.setrlimit(res, (value, value))
    if not sys.platform.startswith("linux"):
        _switch_identity(s)
        return
    libc = _libc()
    wanted = {CAPABILITIES[n] for n in s.capabilities or ()}
    if s.capabilities is not None:
        _drop_capabilities(libc, wanted)
    _switch_identity(s)
    if s.capabilities is not None:
        _capset(libc, sum(1 << c for c in wanted))
        for cap in sorted(wanted):
            _prctl(libc, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap)
    if s.no_new_privs:
        _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)
    if not s.dumpable or s.uid is not None:
        # A uid switch leaves the process non-dumpable (and its /proc files root's,
        # even to itself); an exec'd worker is dumpable again after execve, so this is
        # set explicitly both ways: the same result for both ways in.
        _prctl(libc, _PR_SET_DUMPABLE, 1 if s.dumpable else 0)
