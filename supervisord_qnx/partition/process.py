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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from supervisord_qnx.partition import privileges


@dataclass(frozen=True)
class ProcessSettings:
    """What a worker process is set up with before exec (empty: nothing changes)."""

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
    # Identity and privileges last: what comes before may need root.
    wrappers += privileges.wrappers(settings)
    return [*wrappers, *argv]


def apply_self(settings: ProcessSettings) -> None:
    """Apply ``settings`` to the calling process (a fork server child, before tenant code).

    Raises ``OSError`` when a setting cannot be applied: the caller reports it as a
    failed start rather than run the tenant without it."""
    if settings.is_default():
        return
    privileges.apply_self(settings)
