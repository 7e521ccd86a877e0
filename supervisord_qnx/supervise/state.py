"""The daemon's runtime state in ``state_dir/runtime.json``: what a restarted or
re-executed daemon needs to carry on where its predecessor stopped (docs/state.md).

What it holds: the operator's decisions (tenants stopped or started by hand, figures
changed with ``set``), and per worker instance its state, pid and start time, restart
count, backoff deadline, the fingerprint of its definition and its log writer. What
it is for: adoption (``supervise/adopt.py``) and operator-stopped tenants that stay
stopped.

Why one JSON file, rewritten whole: it is small (about 300 bytes per worker), a
reader needs all of it at once, and one atomic replace (``atomicfile.write``: temp
file, ``fsync``, ``rename``, ``fsync`` of the directory) can never leave half of an
update. Around the body sit a format name, a version and a checksum of the body (CRC-32;
version 1 files, from earlier daemons, carry its SHA-256 and are read as well): a
file that is torn (a disk that lied about ``fsync``), edited by hand or written by a
newer daemon is *detected*, logged, moved aside (kept for a post-mortem) and the
daemon starts as on a fresh boot. It never crashes on it, and never adopts from it.

Why CRC-32 and not a cryptographic digest: the checksum guards against accidents (a
torn write, a hand edit), not an attacker, who could recompute any unkeyed digest in
a directory only root may write. ``zlib.crc32`` is already loaded, takes 0.1 ms for
the 480 KB body of 1,000 workers and releases the GIL while it runs; the interpreter's
own SHA-256 took 1.5-1.8 ms with the GIL held, a pause of the event loop on every
coalesced write (a restart or a status answer waited behind it).

Writes never block the event loop and coalesce: a change only sets a flag; one task
takes a snapshot (in the loop, so it is consistent), waits ``COALESCE`` seconds for
the burst to end, and writes it in a thread. A burst of a hundred state changes (a
tenant of 100 workers starting) costs one or two writes, not a hundred. The daemon's
snapshot keeps each worker's part as text made again only when it changed
(``statebody.py``), and the checksum is taken in the thread: a write costs the loop about
a millisecond at 1,000 workers instead of 19-27 ms.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from supervisord_qnx import atomicfile
from supervisord_qnx.digest import sha256_hex

log = structlog.get_logger("supervisord_qnx.state")

STATE_FILE = "runtime.json"
FORMAT = "supervisord-qnx-runtime-state"
VERSION = 2
# How long a change waits for more before the file is written: short enough that a
# SIGKILL right after an operator's `stop` answer rarely loses it (the answer itself
# waits for the stop, which takes longer), long enough to fold a start-up's burst.
COALESCE = 0.02
# And at most this many bytes a second go to the file while changes keep coming (a
# crash loop, restarts one after another): the body of 1,000 workers is 300 KB with
# two fsyncs, which the cost of its snapshot on the loop used to space out by 40-50 ms;
# now that the snapshot is cheap (statebody.py), this keeps that spacing.
MAX_BYTES_PER_SECOND = 6_000_000


class Unusable(Exception):
    """The state file cannot be trusted (torn, corrupt, unknown format or version)."""


class Raw(str):
    """A value of the body already in its canonical text (``dumps`` of it), spliced into
    the body's text as it is (supervise/statebody.py keeps the tenants so)."""

    __slots__ = ()


def dumps(value: Any) -> str:
    """The canonical text of a JSON value: what the file's checksum is of."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def canonical(body: dict[str, Any]) -> str:
    """``dumps(body)``, where a top-level ``Raw`` value stands for the value it is the
    text of."""
    if not any(isinstance(v, Raw) for v in body.values()):
        return dumps(body)
    items = sorted(body.items())
    return (
        "{"
        + ",".join(dumps(k) + ":" + (v if isinstance(v, Raw) else dumps(v)) for k, v in items)
        + "}"
    )


def encode(body: dict[str, Any]) -> bytes:
    return wrap(canonical(body))


def wrap(canonical: str) -> bytes:
    """The file's bytes around a body's canonical text. Touches nothing but that str
    (immutable), so it may run in a thread: the checksum of 480 KB is 0.1 ms, without
    the GIL."""
    body = canonical.encode()
    # The body goes in as the canonical text the checksum is of: encoded once, by the C
    # encoder. An indented body took the pure-Python encoder, 300 KB at N = 1000 on the
    # event loop for every write of a start-up's burst (bench/bench_supervisor.py).
    head = json.dumps({"crc32": _crc32(body), "format": FORMAT, "version": VERSION}, indent=1)
    # The bytes the checksum was taken of, joined once: a str made whole and then encoded
    # again copied the body twice more (0.5 ms at N = 1000, the GIL held: the event loop
    # waited).
    return b"".join((b'{\n "body": ', body, b",\n", head[2:].encode()))


def decode(data: bytes) -> dict[str, Any]:
    """The body of a state file; raises ``Unusable`` with the reason."""
    try:
        outer = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unusable(f"not JSON (torn or corrupt): {exc}") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise Unusable("not a supervisord-qnx runtime state file")
    version = outer.get("version")
    checksum = CHECKSUMS.get(version) if type(version) is int else None  # not True, 2.0
    if checksum is None:
        known = " and ".join(str(v) for v in CHECKSUMS)
        raise Unusable(f"version {version!r}, this daemon reads versions {known} only")
    body = outer.get("body")
    if not isinstance(body, dict):
        raise Unusable("no body")
    key, of = checksum
    if of(dumps(body).encode()) != outer.get(key):
        raise Unusable("checksum mismatch (torn or edited)")
    return body


def _crc32(data: bytes) -> str:
    """The checksum of a version 2 file: CRC-32 (zlib's), 8 lower-case hex digits."""
    return f"{zlib.crc32(data):08x}"


# Versions this daemon reads: each one's checksum key, and how it is taken. Version 1
# (daemons before the CRC) is read so that an upgrade adopts the workers it finds.
CHECKSUMS: dict[int, tuple[str, Callable[[bytes], str]]] = {
    1: ("sha256", sha256_hex),
    2: ("crc32", _crc32),
}


def load(state_dir: Path) -> dict[str, Any] | None:
    """The previous instance's state, or ``None`` (none, or unusable: then the file is
    moved aside as ``runtime.json.bad-<unix time>`` and the reason logged). Blocking."""
    path = state_dir / STATE_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        _set_aside(path, f"cannot be opened: {exc}")
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read()
    except OSError as exc:
        _set_aside(path, f"cannot be read: {exc}")
        return None
    try:
        return decode(data)
    except Unusable as exc:
        _set_aside(path, str(exc))
        return None


def _set_aside(path: Path, why: str) -> None:
    aside = path.with_name(f"{path.name}.bad-{int(time.time())}")
    try:
        os.replace(path, aside)
        atomicfile.sync_dir(path.parent)
    except OSError as exc:
        log.error("runtime state unusable and cannot be moved aside; starting fresh",
                  file=str(path), reason=why, error=str(exc))  # fmt: skip
        return
    log.error("runtime state unusable; kept aside, starting as on a fresh boot",
              file=str(path), kept=str(aside), reason=why)  # fmt: skip


# -- writing --------------------------------------------------------------------------


@dataclass
class WriteFigures:
    writes: int = 0
    changes: int = 0
    last_seconds: float = 0.0
    max_seconds: float = 0.0
    # The event loop's share of the last coalesced write (snapshot and encoding).
    last_loop_seconds: float = 0.0
    last_bytes: int = 0


# ``snapshot_in_steps(pause)``: the body, awaiting ``pause()`` between steps.
SteppedSnapshot = Callable[[Callable[[], Awaitable[None]]], Awaitable[dict[str, Any]]]


class StateKeeper:
    """Writes ``snapshot()`` to the state file after every change, coalesced, in a
    thread. ``changed()`` is cheap and may be called from any task of the loop."""

    def __init__(
        self,
        state_dir: Path,
        snapshot: Callable[[], dict[str, Any]],
        snapshot_in_steps: SteppedSnapshot | None = None,
    ) -> None:
        self.path = state_dir / STATE_FILE
        self.snapshot = snapshot
        # The same body taken in steps, the loop free between them (statebody.py); used
        # by the coalesced writes only: a final write (reexec, shutdown) takes it whole.
        self.snapshot_in_steps = snapshot_in_steps
        self._busy = self._since = 0.0
        self.figures = WriteFigures()
        self._dirty = trio.Event()
        self._write_lock = trio.Lock()
        # One thread of its own: a slow disk delays the next write, never a spawn's or a
        # stop's thread (trio's default pool).
        self._thread = trio.CapacityLimiter(1)
        self.enabled = True
        self.held = False

    def changed(self, *_: object) -> None:
        self.figures.changes += 1
        if not self.held:
            self._dirty.set()

    def hold(self) -> None:
        """From now on only ``write_now`` writes: the daemon is shutting down, and its
        last write says how it ended. Each coalesced write is a snapshot and an encoding
        of every worker on the event loop: at 1000 workers tens of milliseconds, made
        again every ``COALESCE`` while they stop. Should the daemon be killed half-way,
        the file still holds the state before the shutdown began, which a new daemon
        reads as it reads a crash's (docs/state.md)."""
        self.held = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        loop_time = 0.0
        while True:
            await self._dirty.wait()
            # A burst (1000 workers starting) is folded over a longer time when a write
            # costs the event loop more: at most a third of the loop goes to the state;
            # and a bigger file is written less often (MAX_BYTES_PER_SECOND).
            spacing = self.figures.last_bytes / MAX_BYTES_PER_SECOND
            await trio.sleep(max(COALESCE, 2 * loop_time, spacing))
            self._dirty = trio.Event()
            if self.held:
                continue
            try:
                await self.write_now(in_steps=True)
                loop_time = self.figures.last_loop_seconds
            except OSError as exc:
                # A full or read-only disk: the daemon supervises on; the next change
                # tries again, and a restart meanwhile starts from the last good file.
                log.error("cannot write the runtime state", file=str(self.path), error=str(exc))
                await trio.sleep(1.0)

    async def write_now(self, reason: str = "running", *, in_steps: bool = False) -> None:
        """Write the state as it is now (also the final write before a reexec).
        ``in_steps``: the snapshot lets other tasks run between its steps (a change made
        meanwhile is written by the next coalesced write, as any later change is)."""
        if not self.enabled:
            return
        self._busy, self._since = 0.0, time.perf_counter()
        if in_steps and self.snapshot_in_steps is not None:
            body = await self.snapshot_in_steps(self._pause)
        else:
            body = self.snapshot()
        body["reason"] = reason
        text = canonical(body)
        self.figures.last_loop_seconds = self._busy + time.perf_counter() - self._since
        self.figures.last_bytes = len(text)
        async with self._write_lock:  # one write at a time, in the order taken
            began = time.monotonic()
            await trio.to_thread.run_sync(self._write, text, limiter=self._thread)
            took = time.monotonic() - began
        f = self.figures
        f.writes += 1
        f.last_seconds = took
        f.max_seconds = max(f.max_seconds, took)

    async def _pause(self) -> None:
        """Between two steps of a snapshot: the loop runs what is ready (a restart's next
        step, a status answer), and that time is not counted as the state's."""
        self._busy += time.perf_counter() - self._since
        await trio.lowlevel.checkpoint()
        self._since = time.perf_counter()

    def _write(self, text: str) -> None:
        atomicfile.write(self.path, wrap(text))

    def write_sync(self, reason: str) -> None:
        """Blocking write (shutdown's last word, when the loop is ending)."""
        if not self.enabled:
            return
        body = self.snapshot()
        body["reason"] = reason
        atomicfile.write(self.path, encode(body))
