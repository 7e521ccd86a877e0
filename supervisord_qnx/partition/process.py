"""Per-process settings a worker gets after it joined its partition and before its own
program runs: the one place where identity, privileges, confinement, scheduling and
placement of a worker are decided (issues 13 and 15 add their fields here).

A setting has two ways in, and both must give the same result:

* ``wrapped_argv`` for processes the backends start by ``exec`` (command workers, the
  plain wasm runner): the worker's argv behind small exec wrappers, run after the
  backend's own attach shim, so the process is inside its partition before any of
  it runs and before it drops the privilege that attaching needs;
* ``apply_self`` for a process that sets itself up (the wasm fork server's children,
  ``wasm/forkserver.py``), called after the attach plan and before any tenant code.

Backends that start workers through another launcher (QNX's ``on``) override
``Backend.exec_argv`` and map what they can to that launcher's own options.

Every field's default means "as the daemon would start it", so ``ProcessSettings()``
changes nothing, and ``as_dict``/``from_dict`` carry the settings over the fork
server's socket (plain JSON data).
"""

from __future__ import annotations

import dataclasses
import os
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from supervisord_qnx.partition import privileges, realtime, seccomp


@dataclass(frozen=True)
class ProcessSettings:
    """What a worker process is set up with before exec (empty: nothing changes)."""

    # -- real-time (issue 15): scheduling, CPU affinity, memory locking. Applied first in
    # the chain: raising RLIMIT_MEMLOCK's hard limit and choosing fifo/rr need root.
    # "" keeps the inherited policy; otherwise a name of realtime.POLICIES.
    sched_policy: str = ""
    sched_priority: int = 0
    nice: int | None = None  # absolute nice value; None keeps the inherited one
    cpus: tuple[int, ...] = ()  # affinity; () keeps the inherited (the partition's cpuset)
    # RLIMIT_MEMLOCK (soft = hard) so the program may mlockall(): None keeps the
    # inherited one, -1 is unlimited, else bytes.
    memlock: int | None = None

    # -- identity and privileges (issue 13; docs/security.md#tenants, privileges.py) --
    uid: int | None = None  # setresuid; None: the daemon's own
    gid: int | None = None  # setresgid; None: the daemon's own
    groups: tuple[int, ...] | None = None  # supplementary groups; None: unchanged
    no_new_privs: bool = False  # PR_SET_NO_NEW_PRIVS
    # Capability names (``CAP_NET_BIND_SERVICE``) left in the bounding, inheritable and
    # ambient sets; every other one is dropped. None: the sets are left alone.
    capabilities: tuple[str, ...] | None = None
    umask: int | None = None
    # Resource limits, soft = hard (``RLIM_INFINITY`` = -1); None: inherited.
    rlimit_nofile: int | None = None
    rlimit_core: int | None = None
    rlimit_nproc: int | None = None
    rlimit_stack: int | None = None
    dumpable: bool = True  # False: PR_SET_DUMPABLE 0 (processes that are not exec'd)
    # The container flag (partition/container.py): namespaces, read-only mounts.
    container: bool = False
    writable: tuple[str, ...] = ()  # paths left writable inside the container
    network_none: bool = False  # an empty network namespace
    seccomp: str = ""  # a syscall filter profile (partition/seccomp.py); "": none
    # -- end of identity and privileges --

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON data (lists, not tuples), only the fields that differ from the default."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProcessSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names
        }
        return cls(**kwargs)

    def is_default(self) -> bool:
        return not self.as_dict()


def wrapped_argv(settings: ProcessSettings, argv: Sequence[str]) -> list[str]:
    """``argv`` behind the exec wrappers that apply ``settings`` (none when default)."""
    wrappers: list[str] = []
    if settings.is_default():
        return list(argv)
    wrappers += realtime_wrappers(settings)
    # Identity and privileges last: what comes before may need root.
    wrappers += privileges.wrappers(settings)
    return [*wrappers, *argv]


def apply_self(settings: ProcessSettings) -> None:
    """Apply ``settings`` to the calling process (a fork server child, before tenant code).

    Raises ``OSError`` when a setting cannot be applied: the caller reports it as a
    failed start rather than run the tenant without it."""
    if settings.is_default():
        return
    apply_realtime(settings)
    privileges.apply_self(settings)
    if settings.seccomp:
        # Last: the filter is on everything after it, and nothing after it is the daemon's.
        seccomp.load_self(settings.seccomp)


# -- real-time (issue 15) -----------------------------------------------------------------


def realtime_wrappers(settings: ProcessSettings) -> list[str]:
    """util-linux wrappers, each of which sets one thing and execs the rest of the argv
    (same pid): ``prlimit`` (memlock), ``taskset`` (affinity), ``nice``, ``chrt`` (policy).
    ``chrt`` comes last so the other wrappers do not run at a real-time priority, and the
    whole group before the privilege drop, which would take away the right to set them.
    One exec each: 1.5-4 ms per wrapper on the loaded CI machine (docs/performance.md),
    paid only by workers that set these keys."""
    out: list[str] = []
    if settings.memlock is not None:
        limit = "unlimited" if settings.memlock < 0 else str(settings.memlock)
        out += ["prlimit", f"--memlock={limit}:{limit}", "--"]
    if settings.cpus:
        # taskset and chrt take the program as their first word after the mask/priority
        # (they stop parsing options there); a "--" would be taken as the program.
        out += ["taskset", "-c", realtime.format_cpulist(settings.cpus)]
    if settings.nice is not None:
        # nice(1) adds to the nice value the child inherits: this thread's, as it spawns.
        delta = settings.nice - os.getpriority(os.PRIO_PROCESS, 0)
        if delta:
            out += ["nice", "-n", str(delta), "--"]
    if settings.sched_policy:
        opt = realtime.CHRT_OPTION[settings.sched_policy]
        out += ["chrt", opt, str(settings.sched_priority)]
    return out


def apply_realtime(settings: ProcessSettings) -> None:
    """``realtime_wrappers``' settings applied by the calling process to itself, in the
    same order."""
    if settings.memlock is not None:
        limit = resource.RLIM_INFINITY if settings.memlock < 0 else settings.memlock
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
    if settings.cpus:
        os.sched_setaffinity(0, settings.cpus)
    if settings.nice is not None:
        os.setpriority(os.PRIO_PROCESS, 0, settings.nice)
    if settings.sched_policy:
        policy = realtime.POLICIES[settings.sched_policy]
        os.sched_setscheduler(0, policy, os.sched_param(settings.sched_priority))
