"""What a wasm runner process tells its supervisor when it ends.

Import-light on purpose (stdlib ``json`` only): the supervisor imports it to
interpret exits, and the runner imports it at start-up.

Two channels, in order of trust:

* the **report file** (``--report PATH``), JSON lines appended by the runner::

    {"event": "started", "pid": 123, "cache": "hit", "load_ms": 4.1}
    {"event": "memory-denied", "count": 7, "last_granted": 16777216}
    {"event": "exit", "reason": "trap: out of bounds memory access", "code": 200}
    {"event": "exit", "reason": "deadline", "code": 201, "stopped_by": "epoch-trap"}

  ``read_report`` parses it;
* the **process exit status**: the guest's ``proc_exit`` code (``0`` when
  ``_start`` returns), or one of the fixed ``EXIT_*`` codes below. wasmtime
  only lets a guest exit with 0..125 (``proc_exit(200)`` is an error, reported
  as a trap), so the fixed codes never collide with a real guest code; they are
  also clear of the shell's 126/127 and of 128+signal.

No ``exit`` event means the runner did not finish on its own: it was killed by a
signal (see the wait status) or crashed hard; only then is the status the only
source of truth.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

#: A wasm trap (out-of-bounds access, unreachable, stack overflow, ...).
EXIT_TRAP = 200
#: Fuel exhausted or the epoch deadline (--timeout) passed.
EXIT_DEADLINE = 201
#: The module could not be read, compiled, linked or instantiated.
EXIT_INVALID_MODULE = 202
#: The runner itself failed (a bug, or an unusable environment).
EXIT_RUNNER_ERROR = 203
#: Defensive clamp should a future wasmtime pass proc_exit codes above 125 through;
#: the report keeps the real code.
EXIT_GUEST_OUT_OF_RANGE = 125

#: Largest guest exit code passed through unchanged.
MAX_GUEST_EXIT = 125

REASON_DEADLINE = "deadline"

#: ``stopped_by`` of a ``deadline`` exit event: which mechanism ended the run. The
#: engine trapped the guest at an epoch check (``--timeout``) or when its fuel ran
#: out (``--fuel``); or the guest sat in a host call past the grace period and the
#: runner's timer thread ended the process (``--timeout`` too).
STOPPED_BY_EPOCH = "epoch-trap"
STOPPED_BY_FUEL = "fuel-trap"
STOPPED_BY_GRACE = "grace-exit"
REASON_TRAP_PREFIX = "trap: "
REASON_INVALID_PREFIX = "invalid-module: "
REASON_EXIT_PREFIX = "exit:"
REASON_RUNNER_PREFIX = "runner-error: "


#: How much of the end of a report file ``read_report`` looks at.
REPORT_TAIL = 64 * 1024


def _tail(path: str | os.PathLike[str], limit: int) -> bytes:
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError:
        return b""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return b""
        start = max(0, info.st_size - limit)
        data = os.pread(fd, limit, start)
    finally:
        os.close(fd)
    if start > 0:
        data = data.partition(b"\n")[2]  # the first line is cut: drop it
    return data


def read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summarise the last run recorded in a report file.

    Returns ``{"started": event | None, "exit": event | None,
    "memory_denied": {"count": N, "last_granted": BYTES} | None}``.

    Only events after the last ``started`` event count, so a report path that is
    reused across restarts still describes the latest run. Lines that do not
    parse (a last line cut short by a kill or a full disk) are skipped rather than
    raised: a partial report is still worth reading. A missing file, or anything
    but a regular file at the path (a FIFO would block the reader, a symlink could
    point anywhere), gives all ``None``. Only the last ``REPORT_TAIL`` bytes are
    read: the events that matter are the latest (denial counts are cumulative),
    and a long run's report must not cost its supervisor an unbounded read.
    """
    result: dict[str, Any] = {"started": None, "exit": None, "memory_denied": None}
    data = _tail(path, REPORT_TAIL)
    for raw in data.splitlines():
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        kind = event.get("event")
        if kind == "started":
            result = {"started": event, "exit": None, "memory_denied": None}
        elif kind == "memory-denied":
            result["memory_denied"] = {
                "count": event.get("count"),
                "last_granted": event.get("last_granted"),
            }
        elif kind == "exit":
            result["exit"] = event
    return result
