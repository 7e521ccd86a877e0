"""Who is on the other end of a Unix-socket connection, as the kernel saw it.

The mechanisms, by platform:

* **Linux**: ``SO_PEERCRED`` gives the peer's pid, uid and gid as they were at
  ``connect()``, and ``SO_PEERGROUPS`` (Linux 4.13) its supplementary groups at that
  moment. Both are fixed at connect: a client that changes identity afterwards, or
  passes its descriptor on, keeps the identity it connected with.
* **QNX Neutrino** (and the BSDs): ``getpeereid()`` gives the effective uid and gid
  (no pid, no supplementary groups; those come from the user database, see
  ``access.py``). Python's :mod:`socket` does not wrap it, so it is called from libc
  through :mod:`ctypes`. QNX also has ``LOCAL_PEERCRED`` (a ``struct xucred`` with the
  groups) on io-sock; ``getpeereid`` is used because every QNX 7 and 8 network stack
  has it.
* Elsewhere (no mechanism): ``None``; the server then treats the peer as the daemon's
  own user only if the socket's mode lets no one else connect (``access.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

# Not every Python names it; the number is Linux's own (asm-generic/socket.h).
_SO_PEERGROUPS: Final = getattr(
    socket, "SO_PEERGROUPS", 59 if sys.platform.startswith("linux") else None
)
_MAX_GROUPS: Final = 65536  # NGROUPS_MAX on Linux


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The peer's identity at connect time. ``pid`` is ``None`` where the platform does
    not say (getpeereid); ``groups`` are its supplementary groups where it does."""

    pid: int | None
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def read(sock: Any) -> PeerCredentials | None:
    """The credentials of ``sock``'s peer (a stdlib or trio socket), or ``None``."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is not None:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
        except OSError:
            return None
        pid, uid, gid = struct.unpack("3i", raw)
        return PeerCredentials(pid=pid, uid=uid, gid=gid, groups=_peer_groups(sock))
    return _getpeereid(sock.fileno())


def _peer_groups(sock: Any) -> tuple[int, ...]:
    if _SO_PEERGROUPS is None:
        return ()
    size = 64
    while size <= _MAX_GROUPS:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * size)
        except OSError as exc:
            if exc.errno == 34:  # ERANGE: more groups than room; ask again with more
                size *= 4
                continue
            return ()  # an older kernel: the user database fills in (access.py)
        return struct.unpack(f"{len(raw) // 4}I", raw)
    return ()


@functools.cache
def _libc_getpeereid() -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn: Callable[..., int] = libc.getpeereid
    except (OSError, AttributeError):
        return None  # glibc has no getpeereid: Linux uses SO_PEERCRED above
    return fn


def _getpeereid(fd: int) -> PeerCredentials | None:
    fn = _libc_getpeereid()
    if fn is None:
        return None
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if fn(fd, ctypes.byref(uid), ctypes.byref(gid)) != 0:
        return None
    return PeerCredentials(pid=None, uid=uid.value, gid=gid.value)
