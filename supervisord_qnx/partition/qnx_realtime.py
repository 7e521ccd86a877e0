"""The real-time settings of a worker as options of QNX's own launcher ``on`` and of
``aps create`` (docs/realtime.md), instead of the util-linux wrappers other backends use.

* ``sched`` -> ``on -p PRIORITY[POLICY]`` with ``f`` (FIFO), ``r`` (round robin), ``o``
  (other); QNX has no batch or idle policy, so ``check`` refuses them.
* ``cpus`` and the partition's ``cpuset`` -> ``on -R RUNMASK`` (the CPUs' bit mask): the
  worker's own CPUs if it names any, else its partition's.
* ``memlock`` -> ``on -L MEMLOCK:n:n`` (``inf`` for unlimited).
* ``cpu.critical`` -> ``aps create -B BUDGET_MS -P PRIORITY``: the APS critical budget,
  time that threads at or above the critical priority may run when the partition's
  budget is spent. It belongs to an APS partition, so it needs a ``cpu.budget``.

``nice`` stays a ``nice`` exec wrapper (QNX ships the utility; ``on`` has no option).
"""

from __future__ import annotations

import dataclasses

from supervisord_qnx.partition.backend import BackendError
from supervisord_qnx.partition.process import ProcessSettings
from supervisord_qnx.partition.tree import Partition, PartitionTree

POLICY_LETTER = {"fifo": "f", "rr": "r", "other": "o"}


def on_options(node: Partition, settings: ProcessSettings) -> list[str]:
    options: list[str] = []
    if settings.sched_policy and settings.sched_policy not in POLICY_LETTER:
        raise BackendError(
            f"partition '{node.path}': QNX has no {settings.sched_policy!r} scheduling "
            "policy; use fifo, rr or other"
        )
    if settings.sched_policy:
        options += ["-p", f"{settings.sched_priority}{POLICY_LETTER[settings.sched_policy]}"]
    cpus = settings.cpus or tuple(sorted(node.effective_cpuset or ()))
    if cpus:
        options += ["-R", hex(sum(1 << c for c in cpus))]
    if settings.memlock is not None:
        limit = "inf" if settings.memlock < 0 else str(settings.memlock)
        options += ["-L", f"MEMLOCK:{limit}:{limit}"]
    return options


def without_on_settings(settings: ProcessSettings) -> ProcessSettings:
    """What is left for exec wrappers once ``on`` applies its part."""
    return dataclasses.replace(settings, sched_policy="", sched_priority=0, cpus=(), memlock=None)


def aps_options(node: Partition) -> list[str]:
    if node.critical_budget_ms is None:
        return []
    options = ["-B", str(node.critical_budget_ms)]
    if node.critical_priority is not None:
        options += ["-P", str(node.critical_priority)]
    return options


def check(tree: PartitionTree) -> list[str]:
    return [
        f"partition '{node.path}': cpu.critical needs a cpu.budget (a critical budget "
        "belongs to an APS partition, and only budgeted partitions get one)"
        for node in tree
        if node.critical_budget_ms is not None and node.cpu_budget is None
    ]
