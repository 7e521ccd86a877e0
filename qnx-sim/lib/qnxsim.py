"""Shared state of the qnx-sim utilities: a simulator of QNX adaptive partitioning (APS)
for Linux development. This is NOT QNX; it lets `aps` and `on` command lines written for
QNX 7.x run on a Linux box with the semantics that matter to supervisord-qnx.

Model (and why):

* An APS partition is a record in a JSON state file (``$QNX_SIM_STATE``, default
  ``/tmp/qnx-sim``) plus, where the cgroup v1 ``cpu`` controller is writable, a cgroup
  ``/sys/fs/cgroup/cpu/$QNX_SIM_CGROUP/<name>`` (default root ``qnx-sim``).
* Budgets are enforced with ``cpu.shares`` proportional to the budget, not with CFS
  quota: an APS budget is a guaranteed minimum under contention, and a partition may use
  idle time beyond it ("free time"). Shares give exactly that; quota would cap.
* ``max_budget`` (``aps create/modify -m``) becomes a CFS quota, but only while the
  scheduler policy ``limit_cpu_usage`` is set, as the QNX docs say of ``-m``.
* Partitions are flat in the scheduler (each guarantees its own budget) and
  hierarchical only in budget bookkeeping: creating a partition takes its budget
  from the partition of the process running ``aps create`` (its parent), which is
  ``System`` unless that process was started with ``on -X aps=PARENT``.
* ``System`` (id 0, budget 100% at "boot") has no cgroup: it is every process not
  in another partition.
* Partitions cannot be deleted (QNX 7.x's ``aps`` has no delete command); only a
  "reboot" clears them, which here is ``qnx-sim-reset``.

Concurrent utilities serialise on an ``flock`` of the state directory's lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

CGROUP_CPU = Path(os.environ.get("QNX_SIM_CGROUP_MOUNT", "/sys/fs/cgroup/cpu"))
NAME_MAX = 15
SHARES_PER_PERCENT = 100  # 20% -> 2000 shares; cpu.shares accepts 2..262144
DEFAULT_MAX_PARTITIONS = 32  # QNX 7.0/7.1 (6.x had 8); counts System
CFS_PERIOD_US = 100_000
SIM_BANNER = "qnx-sim: a simulator of the QNX utility for Linux development (not QNX)"


class SimError(Exception):
    """A failure the utility reports on stderr with its exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def state_dir() -> Path:
    return Path(os.environ.get("QNX_SIM_STATE", "/tmp/qnx-sim"))


def cgroup_root_name() -> str:
    return os.environ.get("QNX_SIM_CGROUP", "qnx-sim").strip("/")


def cgroup_root() -> Path:
    return CGROUP_CPU / cgroup_root_name()


def max_partitions() -> int:
    return int(os.environ.get("QNX_SIM_APS_MAX", DEFAULT_MAX_PARTITIONS))


def cgroups_writable() -> bool:
    """Whether budgets can really be enforced: the cgroup v1 cpu hierarchy is writable."""
    root = cgroup_root()
    if root.is_dir():
        return os.access(root, os.W_OK)
    return (CGROUP_CPU / "cpu.shares").exists() and os.access(CGROUP_CPU, os.W_OK)


def _initial_state() -> dict:
    return {
        "partitions": [
            {
                "id": 0,
                "name": "System",
                "parent": None,
                "budget": 100.0,
                "max_budget": 100.0,
                "critical_ms": 0,
                "critical_priority": None,
            }
        ],
        "scheduler": {
            "policies": ["normal"],
            "window_ms": 100,
            "security": ["none"],
            "bankruptcy": ["basic"],
        },
    }


@contextlib.contextmanager
def locked_state(write: bool = True) -> Iterator[dict]:
    """The state, under an exclusive lock; written back on a clean exit when ``write``."""
    sdir = state_dir()
    sdir.mkdir(parents=True, exist_ok=True)
    with open(sdir / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = sdir / "partitions.json"
        state = json.loads(path.read_text()) if path.exists() else _initial_state()
        yield state
        if write:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, path)


def find(state: dict, ref: str) -> dict | None:
    """A partition by name, or by id when ``ref`` is all digits (names can't start with one)."""
    for part in state["partitions"]:
        if (ref.isdigit() and part["id"] == int(ref)) or part["name"] == ref:
            return part
    return None


def by_id(state: dict, pid: int | None) -> dict | None:
    return next((p for p in state["partitions"] if p["id"] == pid), None)


def check_name(name: str) -> None:
    if not name or "/" in name or name[0].isdigit() or len(name) > NAME_MAX:
        raise SimError(
            f"invalid partition name {name!r}: a name must not start with a digit or "
            f"include slashes, and must be at most {NAME_MAX} characters (EINVAL)"
        )


def parse_percent(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SimError(f"option {option} needs a percentage, got {text!r}", 2) from None
    if not 0 <= value <= 100:
        raise SimError(f"option {option}: {value:g}% is outside 0..100 (EINVAL)")
    return value


def own_partition_name(pid: int | str = "self") -> str:
    """The APS partition a process is in: its cpu cgroup below our root, else System."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    prefix = "/" + cgroup_root_name() + "/"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(",") and path.startswith(prefix):
            return path[len(prefix) :].split("/", 1)[0]
    if pid == "self":
        # Without writable cgroups, `on` records the partition in the environment instead.
        return os.environ.get("QNX_SIM_APS_PARTITION", "System")
    return "System"


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def apply_cgroup(state: dict, part: dict) -> None:
    """Make the partition's cgroup match its record (no-op for System or without cgroups)."""
    if part["id"] == 0 or not cgroups_writable():
        return
    root = cgroup_root()
    root.mkdir(exist_ok=True)
    cg = root / part["name"]
    cg.mkdir(exist_ok=True)
    shares = max(2, min(262144, round(part["budget"] * SHARES_PER_PERCENT)))
    _write(cg / "cpu.shares", str(shares))
    limited = "limit_cpu_usage" in state["scheduler"]["policies"]
    quota = -1
    if limited and part["max_budget"] < 100:
        ncpu = os.cpu_count() or 1
        quota = max(1000, round(part["max_budget"] / 100 * CFS_PERIOD_US * ncpu))
    _write(cg / "cpu.cfs_period_us", str(CFS_PERIOD_US))
    _write(cg / "cpu.cfs_quota_us", str(quota))
    _apply_critical(state, root, cg, part)


def critical_rt_runtime(state: dict, part: dict) -> int:
    """The critical budget as Linux RT group runtime: ``critical_ms`` of every averaging
    window becomes the same share of ``cpu.rt_period_us`` for the partition's fifo/rr
    threads (QNX's critical threads are those at or above the critical priority; Linux
    RT group scheduling bounds real-time threads only, the nearest equivalent)."""
    window = state["scheduler"].get("window_ms", 100) or 100
    return round(min(part.get("critical_ms", 0) / window, 0.9) * RT_PERIOD_US)


def _apply_critical(state: dict, root: Path, cg: Path, part: dict) -> None:
    if not (cg / "cpu.rt_runtime_us").exists():
        return  # no RT group scheduling: real-time threads need no runtime
    runtime = critical_rt_runtime(state, part)
    total = sum(critical_rt_runtime(state, p) for p in state["partitions"] if p["id"] != 0)
    try:
        have = int((root / "cpu.rt_runtime_us").read_text())
    except (OSError, ValueError):
        have = 0
    if total > have:
        _write(root / "cpu.rt_runtime_us", str(total))
    _write(cg / "cpu.rt_runtime_us", str(runtime))


RT_PERIOD_US = 1_000_000


def join(part: dict, pid: int = 0, tid: int = 0) -> None:
    """Move a process (or one thread) into a partition; ``pid`` 0 means the caller."""
    if part["id"] == 0:
        if not cgroups_writable():
            return
        target = CGROUP_CPU
    else:
        target = cgroup_root() / part["name"]
        if not cgroups_writable():
            return
    if tid:
        _write(target / "tasks", str(tid))
    else:
        _write(target / "cgroup.procs", str(pid or os.getpid()))


def fail(prog: str, err: SimError) -> int:
    print(f"{prog}: {err}", file=sys.stderr)
    return err.status


_SIZE = re.compile(r"^(\d+|inf|unlimited)$", re.IGNORECASE)


def parse_rlimit_value(text: str) -> int:
    import resource

    if not _SIZE.match(text):
        raise SimError(f"bad rlimit value {text!r}: a number or 'inf'", 2)
    if text.isdigit():
        return int(text)
    return resource.RLIM_INFINITY
