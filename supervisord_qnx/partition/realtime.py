"""Real-time vocabulary shared by the config, the spawn path and ``status``: scheduling
policies, CPU lists, and reading back what the kernel actually applied to a process.

A leaf module (it imports nothing of the package), so the config model (pure
validation), ``partition/process.py`` (exec wrappers and ``apply_self``) and the control
methods all speak the same words. See docs/realtime.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

# Policy names as written in a tenant file -> the kernel's constant (Linux).
POLICIES: dict[str, int] = {
    "other": os.SCHED_OTHER,
    "batch": os.SCHED_BATCH,
    "idle": os.SCHED_IDLE,
    "fifo": os.SCHED_FIFO,
    "rr": os.SCHED_RR,
}
NAMES: dict[int, str] = {v: k for k, v in POLICIES.items()}
REALTIME = frozenset({"fifo", "rr"})
# chrt(1)'s option for each policy (util-linux).
CHRT_OPTION = {"other": "-o", "batch": "-b", "idle": "-i", "fifo": "-f", "rr": "-r"}
# sched_getscheduler(2) ORs this flag into the policy of a process that asked for it.
RESET_ON_FORK = getattr(os, "SCHED_RESET_ON_FORK", 0x40000000)

RT_RUNTIME = "/proc/sys/kernel/sched_rt_runtime_us"
RT_PERIOD = "/proc/sys/kernel/sched_rt_period_us"


def priority_range(policy: str) -> tuple[int, int]:
    """The priorities the kernel accepts for ``policy`` (0..0 for the non-RT ones)."""
    code = POLICIES[policy]
    return os.sched_get_priority_min(code), os.sched_get_priority_max(code)


def host_cpus() -> frozenset[int]:
    """The CPUs this machine has (0 .. cpu_count-1): a CPU outside is a config error."""
    return frozenset(range(os.cpu_count() or 1))


def parse_cpulist(text: str) -> tuple[int, ...]:
    """``"0-1,3"`` (the kernel's cpulist format) -> ``(0, 1, 3)``; ``ValueError`` if bad."""
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            raise ValueError(f"{text!r} is not a CPU list like '1' or '0-1,3'")
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"{text!r} is not a CPU list like '1' or '0-1,3'") from None
        if first < 0 or last < first:
            raise ValueError(f"{part!r} in {text!r} is not an ascending CPU range")
        out.update(range(first, last + 1))
    return tuple(sorted(out))


def format_cpulist(cpus: Iterable[int]) -> str:
    """``(0, 1, 3)`` -> ``"0-1,3"``, the form ``cpuset.cpus`` and ``taskset -c`` take."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def missing_cpus(cpus: Sequence[int]) -> list[int]:
    return sorted(set(cpus) - host_cpus())


def rt_throttling() -> dict[str, Any]:
    """The kernel's RT throttling (``--check``): RT tasks together get at most ``runtime_us``
    of every ``period_us`` on each CPU, so a runaway fifo task cannot starve the machine
    completely. ``runtime_us = -1`` means the rail is off."""
    out: dict[str, Any] = {"runtime_us": None, "period_us": None, "enabled": False}
    try:
        with open(RT_RUNTIME) as f:
            out["runtime_us"] = int(f.read())
        with open(RT_PERIOD) as f:
            out["period_us"] = int(f.read())
    except (OSError, ValueError):
        return out
    out["enabled"] = out["runtime_us"] >= 0
    return out


def readback(pid: int) -> dict[str, Any] | None:
    """What the kernel applied to ``pid``: policy, priority, nice, affinity. ``None`` when
    the process is gone. Blocking syscalls: call it from a thread for many pids."""
    try:
        raw = os.sched_getscheduler(pid)
        param = os.sched_getparam(pid)
        cpus = os.sched_getaffinity(pid)
        nice = os.getpriority(os.PRIO_PROCESS, pid)
    except (ProcessLookupError, PermissionError):
        return None
    policy = raw & ~RESET_ON_FORK
    return {
        "policy": NAMES.get(policy, str(policy)),
        "priority": param.sched_priority,
        "nice": nice,
        "cpus": format_cpulist(cpus),
    }


def readback_many(pids: Iterable[int]) -> dict[int, dict[str, Any] | None]:
    return {pid: readback(pid) for pid in pids}
