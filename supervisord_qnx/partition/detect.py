"""Pick the partition backend for this machine (``daemon.backend``).

``auto`` prefers the strongest enforcement available: cgroup2 when its memory controller
is delegated to us and writable, else cgroup v1 when its memory hierarchy is writable,
else QNX on QNX, else the portable backend (rlimits plus user-space accounting). Memory is
the deciding controller because a hard memory cap is the one guarantee tenants cannot be
given from user space without a window; cpu and pids follow whatever the chosen hierarchy
offers, and ``enforcement()`` reports the result honestly.

A backend named explicitly must work: if it cannot, ``BackendUnavailable`` says why
(read-only mount, controller missing, not delegated, not root) instead of silently
falling back to something weaker.

The portable and QNX backends are imported lazily so this module (and the cgroup
backends) import on machines or checkouts where they are absent.
"""

from __future__ import annotations

import importlib
import sys

from supervisord_qnx.partition.backend import Backend, BackendUnavailable
from supervisord_qnx.partition.cgroup_v1 import Cgroup1Backend
from supervisord_qnx.partition.cgroup_v2 import Cgroup2Backend

NAMES = ("auto", "portable", "cgroup1", "cgroup2", "qnx")


def _lazy(module: str, cls: str) -> type[Backend]:
    try:
        found: type[Backend] = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise BackendUnavailable(f"{module}.{cls} is not available: {exc}") from exc
    return found


def choose_backend(
    name: str,
    *,
    cgroup_root: str | None,
    instance: str | None = None,
    sample_interval: float = 0.25,
) -> Backend:
    """Return a constructed backend for ``name`` (one of ``NAMES``)."""
    if name not in NAMES:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    reasons: list[str] = []
    if name in ("auto", "cgroup2"):
        why = Cgroup2Backend.probe(cgroup_root=cgroup_root, instance=instance)
        if why is None:
            return Cgroup2Backend(cgroup_root, instance=instance, sample_interval=sample_interval)
        if name == "cgroup2":
            raise BackendUnavailable(f"cgroup2: {why}")
        reasons.append(f"cgroup2: {why}")
    if name in ("auto", "cgroup1"):
        why = Cgroup1Backend.probe()
        if why is None:
            return Cgroup1Backend(cgroup_root, instance=instance, sample_interval=sample_interval)
        if name == "cgroup1":
            raise BackendUnavailable(f"cgroup1: {why}")
        reasons.append(f"cgroup1: {why}")
    if name == "qnx" or (name == "auto" and sys.platform.startswith("qnx")):
        qnx = _lazy("supervisord_qnx.partition.qnx", "QnxBackend")
        why = qnx.probe()
        if why is not None:
            raise BackendUnavailable(f"qnx: {why}")
        return qnx(sample_interval=sample_interval)  # type: ignore[call-arg]
    portable = _lazy("supervisord_qnx.partition.portable", "PortableBackend")
    why = portable.probe()
    if why is not None:
        raise BackendUnavailable("; ".join([*reasons, f"portable: {why}"]))
    return portable(sample_interval=sample_interval)  # type: ignore[call-arg]
