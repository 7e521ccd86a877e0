"""Workers a dead daemon started but never recorded (docs/state.md, "the window").

A worker spawned less than one state write before its daemon was SIGKILLed is not in
the runtime state, so adoption (adopt.py) cannot know it. On the cgroup backends the
start-up reap kills it with its leaf; on portable nothing in the OS holds it but its
environment. Every worker's environment carries the leaf tag
(``SUPERVISORD_QNX_LEAF=<partition>:<leaf>``, partition/accounting.py) and
``OWNER_ENV``: a digest of the daemon's ``state_dir`` (one daemon per state dir: the
ownership lock), which names *this daemon's* workers among every process on the machine,
including another daemon's with the same partition names.

At start, after the plan: every process carrying this daemon's owner and a leaf tag
whose leaf is not adopted is a leftover and is stopped (SIGTERM, SIGKILL after
``adopt.LEFTOVER_STOP_WAIT``), each signal sent through a pidfd opened before its start
time is checked again, so a pid reused meanwhile is never signalled. A process
without our owner value is never touched, whatever its tag says. Descendants of a
leftover carry the same variables and are stopped with it; those of an adopted worker
carry an adopted leaf and are spared.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TypeVar

import structlog

from supervisord_qnx.digest import sha256_hex
from supervisord_qnx.partition import accounting
from supervisord_qnx.partition.proctime import LINUX

T = TypeVar("T")

log = structlog.get_logger("supervisord_qnx.leftovers")

OWNER_ENV = accounting.OWNER


def owner_value(state_dir: Path) -> str:
    """This daemon's owner value: the same for every daemon of one ``state_dir``."""
    return sha256_hex(os.path.realpath(state_dir).encode())[:16]


def _environ(pid: int) -> dict[bytes, bytes]:
    try:
        data = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key] = value
    return out


def find(owner: str, keep: Collection[tuple[str, str]]) -> list[tuple[int, int | str]]:
    """``(pid, start time)`` of every process carrying ``owner`` and a leaf tag whose
    ``(partition, leaf)`` is not in ``keep``. Blocking (reads every ``/proc/PID/environ``)."""
    kept = {accounting.tag_value(path, leaf) for path, leaf in keep}
    own, found = os.getpid(), []
    for pid in accounting.all_pids():
        if pid == own:
            continue
        env = _environ(pid)
        if env.get(OWNER_ENV.encode()) != owner.encode():
            continue
        tag = env.get(accounting.TAG.encode())
        if tag is None or tag.decode("utf-8", "replace") in kept:
            continue
        ticks = LINUX.start_time(pid)
        if ticks is not None:
            found.append((pid, ticks))
    return found


def term_then_kill(
    targets: Sequence[T],
    send: Callable[[T, signal.Signals], None],
    gone: Callable[[T], bool],
    wait: float,
) -> None:
    """SIGTERM every target, wait up to ``wait`` seconds until all are ``gone``, then the
    same with SIGKILL. ``send`` decides how a target is signalled and checks it is still
    the process meant (a pidfd, or its start time); ``gone`` compares its start time.
    Blocking: the daemon calls it before its event loop runs, or in a thread."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if sig is signal.SIGKILL and all(gone(t) for t in targets):
            return
        for target in targets:
            send(target, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if all(gone(t) for t in targets):
                break
            time.sleep(0.02)


def stop(owner: str, keep: Collection[tuple[str, str]], wait: float) -> list[int]:
    """Stop the leftovers ``find`` names; returns their pids. Blocking."""
    targets: list[tuple[int, int | str, int]] = []
    for pid, ticks in find(owner, keep):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        # Checked after the pidfd holds the process: the pidfd now names it for good.
        if LINUX.start_time(pid) == ticks:
            targets.append((pid, ticks, pidfd))
        else:
            os.close(pidfd)

    def send(target: tuple[int, int | str, int], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            signal.pidfd_send_signal(target[2], sig)

    try:
        term_then_kill(targets, send, lambda t: LINUX.start_time(t[0]) != t[1], wait)
    finally:
        for _, _, pidfd in targets:
            os.close(pidfd)
    if targets:
        log.warning("stopped workers of the previous daemon that its state did not name",
                    pids=[p for p, _, _ in targets])  # fmt: skip
    return [p for p, _, _ in targets]
