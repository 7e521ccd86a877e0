"""How a process is named across daemon lifetimes (partition/proctime.py): the QNX clock
reads `pidin`'s start time (the qnx-sim simulator's, answering from Linux's /proc) and
tells a process from another one that reuses its pid."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from supervisord_qnx.partition.proctime import LINUX, QnxClock, parse_pidin_times
from tests.test_qnx_sim import SIM_BIN

HEAD = "     pid name                   sid  start time   utime  stime cutime cstime"


def test_pidin_start_times_are_read_in_both_of_its_forms() -> None:
    now = time.localtime()
    recent = time.strftime("%b %d %H:%M", now)
    rows = [HEAD, f"    4242 sh                      12 {recent}  0.010  0.000  0.000  0.000"]
    assert parse_pidin_times(rows, 4242) == time.strftime("%Y-%m-%d %H:%M", now)
    old = [HEAD, "       1 /procnto-smp-instr       1 Jan 01  1970 31m06s  0.959  0.040  0.000"]
    assert parse_pidin_times(old, 1) == "1970-01-01"
    # Another pid's row, or none: no start time (the process is gone).
    assert parse_pidin_times(rows, 4243) is None
    assert parse_pidin_times([HEAD], 4242) is None


def test_a_start_later_in_the_year_than_now_was_last_year() -> None:
    now = time.localtime()
    if (now.tm_mon, now.tm_mday) == (12, 31):
        pytest.skip("no later day in the year to try")
    rows = [HEAD, "       7 x 1 Dec 31 23:59  0.0 0.0 0.0 0.0"]
    assert parse_pidin_times(rows, 7) == f"{now.tm_year - 1}-12-31 23:59"


def test_the_qnx_clock_through_the_simulators_pidin_tells_processes_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", f"{SIM_BIN}{os.pathsep}{os.environ['PATH']}")
    clock = QnxClock()
    assert clock.name == "qnx-pidin" and not clock.cheap
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = clock.start_time(child.pid)
        assert isinstance(mine, str)
        assert clock.parent_of(child.pid) == os.getpid()
        # Process 1 started with the boot: its start time names the boot.
        assert clock.boot_id() == f"qnx-procnto-start:{clock.start_time(1)}"
    finally:
        child.kill()
        child.wait(30)
    assert clock.start_time(child.pid) is None  # gone (and waited for)
    assert LINUX.start_time(os.getpid()) != mine  # the Linux clock counts ticks
