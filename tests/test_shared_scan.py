"""accounting.SharedScan: concurrent leaf checks share /proc scans, and a caller never
gets a scan that started before it asked (it would miss a process started just before)."""

from __future__ import annotations

import threading
import time

from supervisord_qnx.partition.accounting import SharedScan


def test_callers_share_a_scan_that_started_after_they_asked() -> None:
    started: list[int] = []
    release_first = threading.Event()

    def scan() -> int:
        started.append(len(started) + 1)
        n = started[-1]
        if n == 1:
            release_first.wait(10)  # the first scan is under way while the others ask
        return n

    shared = SharedScan(scan)
    got: dict[str, int] = {}

    def ask(name: str) -> None:
        got[name] = shared.get()

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    deadline = time.monotonic() + 10
    while not started and time.monotonic() < deadline:
        time.sleep(0.001)
    late = [threading.Thread(target=ask, args=(f"late{i}",)) for i in range(5)]
    for t in late:
        t.start()
    time.sleep(0.05)  # let them queue behind the scan in progress
    release_first.set()
    for t in (first, *late):
        t.join(10)
    assert got["first"] == 1
    # Asked while scan 1 ran: scan 1 may predate what they look for; one new scan for all.
    assert {got[f"late{i}"] for i in range(5)} == {2}
    assert started == [1, 2]


def test_a_failed_scan_is_not_handed_to_anyone() -> None:
    calls = []

    def scan() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("proc unreadable")
        return "ok"

    shared = SharedScan(scan)
    try:
        shared.get()
    except OSError:
        pass
    else:
        raise AssertionError("the scan's error was swallowed")
    assert shared.get() == "ok"
