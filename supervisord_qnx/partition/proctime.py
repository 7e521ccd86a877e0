"""Naming one process across daemon lifetimes: a pid plus its start time (and the boot it
belongs to). A pid alone can be reused by an unrelated process while no daemon runs; the
pair cannot. The runtime state records the pair (supervise/state.py), adoption checks it
(supervise/adopt.py) before it adopts or signals anything.

Each platform reads a start time its own way, so the backend chooses the clock
(``Backend.process_clock``):

* ``LinuxClock``: ``/proc/PID/stat`` field 22 (clock ticks after boot), the boot named
  by ``/proc/sys/kernel/random/boot_id``. A file read: cheap enough for the event loop.
* ``QnxClock``: QNX has no ``/proc/PID/stat``. Natively it asks procfs,
  ``devctl(DCMD_PROC_INFO)`` on ``/proc/PID/as``, whose ``procfs_info.start_time`` is the
  start in nanoseconds since 1970 (docs/qnx.md cites the layout). Where there is no
  ``devctl`` (the qnx-sim simulator on Linux) it runs the ``pidin`` utility:
  ``pidin -p PID times`` has a ``start time`` column (minute resolution), and
  ``pidin -p PID -F "%a %e"`` the parent. The boot is named by the start time of
  process 1 (procnto on QNX), which changes with every boot. Spawning ``pidin`` is not
  for the event loop: ``cheap`` is false and callers read it in a thread.

A start time is an opaque token (``int`` or ``str``) compared for equality only.
"""

from __future__ import annotations

import calendar
import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

Token = int | str
UtilityRunner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


class LinuxClock:
    """Start times from ``/proc/PID/stat`` (Linux)."""

    name = "linux-proc-stat"
    cheap = True

    def boot_id(self) -> str | None:
        """This boot's id; a state file from another boot adopts nothing."""
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                return f.read().strip()
        except OSError:
            return None

    def start_time(self, pid: int, *, zombie: bool = False) -> Token | None:
        """When ``pid`` started, in clock ticks after boot; ``None`` if it is gone or a
        zombie (unless ``zombie``: a child of ours that ended and waits for us)."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except OSError:
            return None
        # The command name in (parentheses) may hold spaces and ')': split after the last.
        rest = text.rsplit(")", 1)[1].split()
        if rest[0] == "X" or (rest[0] == "Z" and not zombie):
            return None
        return int(rest[19])

    def parent_of(self, pid: int) -> int | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None


LINUX = LinuxClock()

# procfs_info (debug_process_t in QNX's <sys/debug.h>): pid, parent, flags, umask, child,
# sibling, pgrp, sid (8 x 32 bits), base_address, initial_stack (2 x 64), uid, gid, euid,
# egid, suid, sgid (6 x 32), sig_ignore, sig_queue, sig_pending (3 x 64-bit sigsets),
# num_chancons, num_fdcons, num_threads, num_timers (4 x 32), then start_time (64 bits,
# nanoseconds since 1970), utime, stime, cutime, cstime, priority, reserved: 272 bytes.
_PROC_INFO_SIZE = 272
_PARENT_OFFSET = 4
_START_TIME_OFFSET = 112
# DCMD_PROC_INFO = __DIOF(_DCMD_PROC, __PROC_SUBCMD_PROCFS + 1, procfs_info) with
# __PROC_SUBCMD_PROCFS = 0 (<sys/procfs.h>): direction "from" (0x40000000), the size in
# bits 16-29, the class _DCMD_PROC (0x0E, <devctl.h>) in bits 8-15, the command below.
_DCMD_PROC_INFO = 0x40000000 | (_PROC_INFO_SIZE << 16) | (0x0E << 8) | 1


class QnxClock:
    """Start times on QNX: procfs ``devctl(DCMD_PROC_INFO)`` where the C library has
    ``devctl`` (QNX), else the ``pidin`` utility (the qnx-sim simulator's on Linux)."""

    cheap = False

    def __init__(self, run: UtilityRunner | None = None, pidin: str = "pidin") -> None:
        self._run: UtilityRunner = run or _run_plain
        self._pidin = pidin
        self._devctl = _find_devctl()
        self._boot: str | None = None
        self.name = "qnx-procfs-devctl" if self._devctl is not None else "qnx-pidin"

    def use_runner(self, run: UtilityRunner) -> None:
        self._run = run

    def boot_id(self) -> str | None:
        """Process 1 (procnto) starts with the boot: its start time names the boot. Read
        once (the runtime state's snapshot asks in the event loop)."""
        if self._boot is None:
            first = self.start_time(1)
            self._boot = None if first is None else f"qnx-procnto-start:{first}"
        return self._boot

    def start_time(self, pid: int, *, zombie: bool = False) -> Token | None:  # noqa: ARG002
        """A zombie counts until its parent waits for it (procfs and pidin both list it)."""
        if self._devctl is not None:
            info = self._proc_info(pid)
            return (
                None
                if info is None
                else int.from_bytes(
                    info[_START_TIME_OFFSET : _START_TIME_OFFSET + 8], sys.byteorder
                )
            )
        out = self._pidin_lines(["-p", str(pid), "times"])
        return None if out is None else parse_pidin_times(out, pid)

    def parent_of(self, pid: int) -> int | None:
        if self._devctl is not None:
            info = self._proc_info(pid)
            if info is None:
                return None
            return int.from_bytes(info[_PARENT_OFFSET : _PARENT_OFFSET + 4], sys.byteorder)
        out = self._pidin_lines(["-p", str(pid), "-F", "%a %e"])
        for line in out or []:
            fields = line.split()
            if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
                return int(fields[1])
        return None

    def _pidin_lines(self, args: list[str]) -> list[str] | None:
        cmd = [shutil.which(self._pidin) or self._pidin, *args]
        try:
            proc = self._run(cmd)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if proc.returncode != 0:
            return None  # no such process (pidin says so and fails)
        return proc.stdout.splitlines()

    def _proc_info(self, pid: int) -> bytes | None:
        assert self._devctl is not None
        try:
            fd = os.open(f"/proc/{pid}/as", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            buf = ctypes.create_string_buffer(_PROC_INFO_SIZE)
            if self._devctl(fd, _DCMD_PROC_INFO, buf, _PROC_INFO_SIZE, None) != 0:
                return None
            return buf.raw
        finally:
            os.close(fd)


def _find_devctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("qnx"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.devctl
        fn.restype = ctypes.c_int
        return fn
    return None


def _run_plain(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30)


_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
)}  # fmt: skip
# "start time" of `pidin times`: "Nov 30 17:32" (recent) or "Jan 01  1970" (older).
_START = re.compile(r"\b([A-Z][a-z]{2}) +(\d{1,2}) +(?:(\d{1,2}):(\d{2})|(\d{4}))\b")


def parse_pidin_times(lines: list[str], pid: int) -> Token | None:
    """The ``start time`` of ``pid`` in ``pidin times`` output, as ``YYYY-MM-DD HH:MM``
    (or ``YYYY-MM-DD`` when pidin shows only the year). The year of a recent start is
    the latest one that does not put it in the future."""
    for line in lines[1:]:
        fields = line.split()
        if not fields or fields[0] != str(pid):
            continue
        m = _START.search(line)
        if m is None or m.group(1) not in _MONTHS:
            return None
        month, day = _MONTHS[m.group(1)], int(m.group(2))
        if m.group(5) is not None:
            return f"{int(m.group(5)):04d}-{month:02d}-{day:02d}"
        hour, minute = int(m.group(3)), int(m.group(4))
        now = time.localtime()
        year = now.tm_year
        stamp = (month, day, hour, minute)
        if stamp > (now.tm_mon, now.tm_mday, now.tm_hour, now.tm_min):
            year -= 1
        # Validates the date (Feb 30 raises) through the calendar.
        calendar.timegm((year, month, day, hour, minute, 0, 0, 0, 0))
        return f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}"
    return None
