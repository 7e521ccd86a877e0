"""Sleeps shorter than a millisecond on the event loop.

trio sleeps by giving ``epoll_wait`` a timeout, and ``select.epoll.poll`` rounds it up
to whole milliseconds: ``trio.sleep(0.0002)`` on a loop with nothing else to do returns
after 1.1-1.2 ms (measured here). The run-end mark's wait polls every 0.2 ms at first
(supervise/logpipe.py: a writer usually reads the mark within a fraction of a
millisecond, and a restart waits for it), so every restart waited a whole millisecond
there unless something else woke the loop, as the benchmark's own status polls did
(issue 14: restart after SIGKILL).

``sleep`` below a millisecond arms a ``timerfd`` (nanosecond resolution) and waits for
it to become readable, which the same ``epoll_wait`` reports as soon as it fires; at a
millisecond or more, or where there is no ``timerfd`` (QNX, non-Linux), it is
``trio.sleep``. One timer per sleep, closed when it ends or is cancelled: three system
calls, a few microseconds.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import cast

import trio

# Below this, a trio sleep would round up to a millisecond.
FINE_BELOW = 0.001
_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _load() -> tuple[Callable[..., int], Callable[..., int]] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):  # no timerfd here
        return None
    create.argtypes = [ctypes.c_int, ctypes.c_int]
    create.restype = ctypes.c_int
    settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
    settime.restype = ctypes.c_int
    return cast(Callable[..., int], create), cast(Callable[..., int], settime)


_TIMERFD = _load()


def available() -> bool:
    return _TIMERFD is not None


def _arm(seconds: float) -> int:
    """A timer that fires once after ``seconds``; -1 if none could be made."""
    assert _TIMERFD is not None
    create, settime = _TIMERFD
    fd = create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
    if fd < 0:
        return -1
    spec = _Itimerspec()
    spec.it_value.tv_nsec = max(1, round(seconds * 1e9))  # under a second: nsec only
    if settime(fd, 0, ctypes.byref(spec), None) != 0:
        os.close(fd)
        return -1
    return fd


async def sleep(seconds: float) -> None:
    """``trio.sleep(seconds)``, precise below a millisecond. A checkpoint, as it is."""
    if seconds >= FINE_BELOW or seconds <= 0 or _TIMERFD is None:
        await trio.sleep(seconds)
        return
    fd = _arm(seconds)
    if fd < 0:
        await trio.sleep(seconds)  # out of descriptors: the coarse sleep still sleeps
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)
