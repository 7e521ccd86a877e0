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

Every backend is imported lazily, only when it is tried: the QNX and portable ones so
that this module imports on machines or checkouts where they are absent, and all of them
so that a daemon holds only the code of the backend it runs (a cgroup v1 daemon does not
import the cgroup v2 backend, a portable one neither cgroup backend: issue 14, daemon
RSS).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from supervisord_qnx.partition.backend import Backend, BackendOptions, BackendUnavailable

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
    options = BackendOptions(
        cgroup_root=cgroup_root, instance=instance, sample_interval=sample_interval
    )
    # In order of preference for "auto"; every backend probes and builds the same way.
    candidates: list[tuple[str, Callable[[], type[Backend]]]] = [
        ("cgroup2", lambda: _lazy("supervisord_qnx.partition.cgroup_v2", "Cgroup2Backend")),
        ("cgroup1", lambda: _lazy("supervisord_qnx.partition.cgroup_v1", "Cgroup1Backend")),
    ]
    if name == "qnx" or (name == "auto" and sys.platform.startswith("qnx")):
        candidates.append(("qnx", lambda: _lazy("supervisord_qnx.partition.qnx", "QnxBackend")))
    candidates.append(
        ("portable", lambda: _lazy("supervisord_qnx.partition.portable", "PortableBackend"))
    )
    reasons: list[str] = []
    for label, load in candidates:
        if name not in ("auto", label):
            continue
        cls = load()
        why = cls.probe(options)
        if why is None:
            return cls.from_options(options)
        if name == label or label == "qnx":
            raise BackendUnavailable(f"{label}: {why}")
        reasons.append(f"{label}: {why}")
    raise BackendUnavailable("; ".join(reasons))
