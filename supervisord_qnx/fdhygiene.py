"""Workers inherit no descriptor of the daemon's, without a close loop per spawn.

``subprocess.Popen(close_fds=True)`` closes every descriptor but 0-2 in the child, one
by one, before the ``exec``. A daemon with N workers holds a few descriptors per worker
(the log pipe and its second opening, the log's lock, pidfds, a cgroup's event fds):
about 6,000 at N = 1000 on cgroup1, and the loop then took 0.6-0.8 ms of every spawn,
on the path of every restart (issue 14: restart after SIGKILL at N = 1000 against
N = 100). The kernel closes descriptors marked close-on-exec at the ``exec`` itself,
for a fraction of that: 0.24 against 0.81 ms per ``Popen`` with 6,000 open here.

Every descriptor Python opens is close-on-exec already (PEP 446): pipes, files,
sockets, pidfds, eventfds. What may not be is what the daemon was *given*: whatever
its parent left open and inheritable (a shell's, a service manager's). ``seal`` marks
each of those close-on-exec once, at the daemon's start, before anything is spawned;
from then on the daemon's worker spawns leave the closing to the kernel
(``partition/backend.py``, ``SpawnRequest.popen_kwargs``). A spawn that passes
descriptors on purpose (``pass_fds``) still closes the rest itself, as does any
process that has not sealed (the library used in-process, the tests' in-process
daemons). ``tests/test_worker_fds.py`` checks what a worker sees.
"""

from __future__ import annotations

import contextlib
import os
import resource

_sealed = False
# Where no /proc/self/fd lists the open descriptors (QNX): how far to look at most.
MAX_SCAN = 65536


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        top = MAX_SCAN if soft == resource.RLIM_INFINITY else min(soft, MAX_SCAN)
        return list(range(3, top))


def seal() -> int:
    """Mark every open descriptor above 2 close-on-exec; from now on ``sealed()``. Call
    once, at the start, before threads or spawns. Returns how many were inheritable."""
    global _sealed
    changed = 0
    for fd in _open_fds():
        if fd <= 2:
            continue
        # Not open (the listing's own descriptor, a hole in the range): nothing to mark.
        with contextlib.suppress(OSError):
            if os.get_inheritable(fd):
                os.set_inheritable(fd, False)
                changed += 1
    _sealed = True
    return changed


def sealed() -> bool:
    """Whether this process has sealed its descriptors (``seal``)."""
    return _sealed
