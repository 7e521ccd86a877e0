"""The partition vocabulary every layer shares: the flags a tenant file may set, the
resource controls it may ask for, and how a backend enforces each.

A leaf module (it imports nothing of the package), so the config model, the partition
tree, the backends and the guard API all take their words from here and none of them
has to import another to speak them.
"""

from __future__ import annotations

import enum


class Flag(enum.StrEnum):
    """A partition flag (the origin design note's ``PartitionFlags``)."""

    HIERARCHICAL = "hierarchical"  # may hold child partitions
    MEMORY_ISOLATION = "memory-isolation"  # separate address spaces, no shared dumps
    CONTAINER = "container"  # its own namespaces


class Control(enum.StrEnum):
    """A resource control a tenant file can ask for (systemd's vocabulary where it fits)."""

    MEMORY_MIN = "memory.min"  # guaranteed minimum (MemoryMin)
    MEMORY_MAX = "memory.max"  # hard cap (MemoryMax)
    MEMORY_RESERVED = "memory.reserved"  # pressure band below max (MemoryHigh = max - reserved)
    CPU_BUDGET = "cpu.budget"  # guaranteed share, may borrow idle CPU (CPUWeight / APS budget)
    CPU_MAX = "cpu.max"  # hard ceiling (CPUQuota / APS max)
    PIDS = "pids"  # number of tasks (TasksMax)
    MEMORY_ISOLATION = Flag.MEMORY_ISOLATION.value  # flag: separate address spaces
    CONTAINER = Flag.CONTAINER.value  # flag: namespaces
    CPUSET = "cpuset"  # CPUs the partition owns (AllowedCPUs / QNX runmask)
    CPU_CRITICAL = "cpu.critical"  # QNX APS critical budget (no Linux equivalent)
    SECCOMP = "seccomp"  # a syscall filter on the tenant's workers (partition/seccomp.py)


class Enforcement(enum.StrEnum):
    KERNEL = "kernel"  # the kernel refuses or kills; no window
    SUPERVISED = "supervised"  # the daemon measures and acts; a fast tenant can overshoot
    NONE = "none"  # accepted in the file, not enforced by this backend
