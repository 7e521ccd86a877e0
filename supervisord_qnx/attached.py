"""Processes the daemon did not start, put into a partition with the ``attach`` method.

The contract (docs/protocol.md, ``attach``/``detach``):

* Only a live process may be attached, and never one whose move would hurt the box: not
  the daemon itself, not one of its ancestors (moving the shell or the service manager
  that started us), not the init of any pid namespace (a container's pid 1), not a thread
  id, and not a worker the daemon supervises. Writing ``0`` to ``cgroup.procs`` moves the
  *writer*, so pid 0 is refused before any backend sees it.
* Where the process was before is recorded at attach time (the backend's ``Placement``),
  and ``detach`` puts it back there; only attached pids can be detached.
* An attached process stays someone else's: at shutdown it is detached, not killed, and
  so it is after a crash (the records are kept in ``state_dir`` and restored by the next
  start before it reaps leftovers). ``own=True`` hands the process to the daemon: it is
  then treated like a tenant's process and killed with its partition.

A pid can be reused once its process is gone, so every record carries the process's
start time (``/proc/PID/stat`` field 22) and a pid whose start time differs is not the
process that was attached.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from supervisord_qnx import atomicfile

log = structlog.get_logger("supervisord_qnx.attached")

STATE_FILE = "attached.json"


class Refused(Exception):
    """The pid may not be attached; ``kind`` is ``not_found`` or ``refused``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    tgid: int
    ppid: int
    state: str
    nspids: tuple[int, ...]  # the pid in every pid namespace it is visible in, outermost first
    started: int  # clock ticks after boot


def inspect(pid: int) -> ProcInfo | None:
    """What /proc says about ``pid``, or ``None`` if there is no such process (or thread)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields: dict[str, str] = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    # The command name in (parentheses) may hold spaces and ')': split after the last ')'.
    rest = stat.rsplit(")", 1)[1].split()
    nspid = fields.get("NSpid", str(pid))
    return ProcInfo(
        pid=pid,
        tgid=int(fields.get("Tgid", pid)),
        ppid=int(fields.get("PPid", 0)),
        state=rest[0],
        nspids=tuple(int(x) for x in nspid.split()),
        started=int(rest[19]),
    )


def ancestors(pid: int | None = None) -> list[int]:
    """The parent, grandparent, ... of ``pid`` (default: this process), nearest first."""
    out: list[int] = []
    info = inspect(os.getpid() if pid is None else pid)
    while info is not None and info.ppid > 0 and info.ppid not in out:
        out.append(info.ppid)
        info = inspect(info.ppid)
    return out


def check(pid: int, supervised: Iterable[int] = ()) -> ProcInfo:
    """Return the process behind ``pid`` if it may be attached, else raise ``Refused``."""
    if pid <= 0:
        # 0 would move the writer itself (the daemon) into the partition.
        raise Refused("bad_request", f"pid must be a positive process id, got {pid}")
    info = inspect(pid)
    if info is None or info.state in ("Z", "X"):
        raise Refused("not_found", f"no process {pid}")
    if info.tgid != pid:
        raise Refused(
            "not_found", f"{pid} is a thread of process {info.tgid}, not a process; attach that"
        )
    if pid == os.getpid():
        raise Refused("refused", f"pid {pid} is the daemon itself")
    if pid in ancestors():
        raise Refused(
            "refused", f"pid {pid} is an ancestor of the daemon (the daemon runs under it)"
        )
    if 1 in info.nspids:
        raise Refused("refused", f"pid {pid} is the init process (pid 1) of a pid namespace")
    if pid in set(supervised):
        raise Refused(
            "refused",
            f"pid {pid} is a worker this daemon supervises; stop or restart its tenant instead",
        )
    return info


@dataclass
class Attached:
    pid: int
    partition: str
    started: int
    own: bool
    previous: Any  # the backend's Placement, from attach

    def same_process(self) -> bool:
        info = inspect(self.pid)
        return info is not None and info.state not in ("Z", "X") and info.started == self.started


class Registry:
    """The attached processes, kept in ``state_dir`` so a crash cannot orphan them."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = state_dir / STATE_FILE if state_dir is not None else None
        self.entries: dict[int, Attached] = {}

    def get(self, pid: int) -> Attached | None:
        return self.entries.get(pid)

    def put(self, entry: Attached) -> None:
        self.entries[entry.pid] = entry
        self.save()

    def drop(self, pid: int) -> Attached | None:
        entry = self.entries.pop(pid, None)
        self.save()
        return entry

    def save(self) -> None:
        if self.path is None:
            return
        if not self.entries:
            atomicfile.remove(self.path)
            return
        data = json.dumps([asdict(e) for e in self.entries.values()]).encode()
        atomicfile.write(self.path, data)

    def load(self) -> list[Attached]:
        """The records a previous daemon left (it crashed before detaching them)."""
        if self.path is None:
            return []
        try:
            raw = json.loads(self.path.read_text())
            return [Attached(**item) for item in raw]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable attached-process records", file=str(self.path),
                        error=str(exc))  # fmt: skip
            return []
