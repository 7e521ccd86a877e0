"""Sub-millisecond sleeps on the event loop (supervisord_qnx/finesleep.py).

What they are for (a restart's run-end mark wait no longer rounded up to a millisecond)
is a timing and is not asserted here (the machine is shared); what is asserted is what
must hold whatever the load: a sleep never ends early, it goes through a timer of its
own while it lasts, and neither an ended nor a cancelled sleep leaves a descriptor open.
"""

from __future__ import annotations

import os
import time

import pytest
import trio

from supervisord_qnx import finesleep


def timers_open() -> int:
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[timerfd]":
                n += 1
        except OSError:
            continue  # the listing's own descriptor
    return n


async def test_a_fine_sleep_lasts_at_least_what_was_asked() -> None:
    for seconds in (0.0001, 0.0002, 0.0005, 0.0009, 0.002):
        began = time.monotonic()
        await finesleep.sleep(seconds)
        assert time.monotonic() - began >= seconds


async def test_a_fine_sleep_waits_on_a_timer_of_its_own_and_closes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert finesleep.available()  # Linux has timerfd: the fine path must be the one taken
    before = timers_open()
    armed: list[str] = []
    arm = finesleep._arm

    def seen_arm(seconds: float) -> int:
        fd = arm(seconds)
        armed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fd

    monkeypatch.setattr(finesleep, "_arm", seen_arm)
    await finesleep.sleep(0.0005)
    # A millisecond or more is trio's own sleep: no timer.
    await finesleep.sleep(0.001)
    assert armed == ["anon_inode:[timerfd]"]
    assert timers_open() == before


async def test_a_cancelled_fine_sleep_leaves_no_descriptor_open() -> None:
    before = timers_open()
    for _ in range(50):
        with trio.move_on_after(0):
            await finesleep.sleep(0.0005)
    assert timers_open() == before
