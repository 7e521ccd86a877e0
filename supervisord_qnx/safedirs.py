"""The daemon's own directories (socket, state, logs): created private, refused when
someone else could tamper with them.

Why: the daemon runs as root and writes into these directories files whose content
tenants control (logs) and the socket through which it takes orders. If another local
user owns one of them, or any directory above it, or can write into one, they can swap
it for a symlink to ``/etc/logrotate.d`` or bind their own socket where root's clients
connect. So every component of each path is checked the way a careful daemon does
(compare OpenSSH's ``StrictModes`` and systemd-tmpfiles' ``unsafe path transition``):

* every directory on the way, and the directory itself, is owned by root or by the
  daemon's user;
* a directory on the way that others may write into is accepted only if it is sticky
  and root's (``/tmp``): there nobody can rename or remove what is not theirs; the
  directories inside it must still be root's or the daemon's;
* the directory itself is the daemon user's and not group- or world-writable; the
  socket's directory may also be a root-owned sticky one (the socket itself is then
  protected by the sticky bit);
* a symlink on the way is followed only if root or the daemon's user owns it (one that
  an operator made); one planted by anyone else is refused;
* what is missing is created: mode ``0700``, or ``0750`` with the socket's group where
  ``socket_group`` is set, owned by the daemon.

The walk opens each directory relative to the one before with ``O_NOFOLLOW`` and checks
what it opened (``fstat``), so a component swapped between the check and the use is
caught. A refusal raises :class:`UnsafePath` naming the path, its owner and mode, and
what to do.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS: Final = 40  # as the kernel's own path walk


class UnsafePath(Exception):
    """A directory of the daemon that someone else could tamper with; ``str()`` says
    which, why, and what to do."""


def secure_dir(
    path: Path | str, *, mode: int = 0o700, group: int | None = None, socket_dir: bool = False
) -> Path:
    """Make sure ``path`` is a directory only the daemon (and ``group``, read-only) can
    change, creating what is missing; return it. Raises :class:`UnsafePath`."""
    uid = os.geteuid()
    path = Path(os.path.abspath(path))
    pending = list(path.parts[1:])
    where = "/"
    fd = os.open("/", _DIR_FLAGS)
    hops = 0
    try:
        _check_on_the_way(os.fstat(fd), where, uid)
        while pending:
            name = pending.pop(0)
            here = os.path.normpath(os.path.join(where, name))
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                created = False
            except FileNotFoundError:
                _make(name, fd, mode, group)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                created = True
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > _MAX_SYMLINKS:
                    raise UnsafePath(f"{path}: too many symlinks on the way")
                _check_symlink(st, here, uid)
                target = os.readlink(name, dir_fd=fd)
                if os.path.isabs(target):  # start again from the root
                    os.close(fd)
                    fd = os.open("/", _DIR_FLAGS)
                    where = "/"
                pending = [p for p in Path(target).parts if p != "/"] + pending
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafePath(f"{here} is not a directory; the daemon needs one there")
            nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd, where = nfd, here
            st = os.fstat(fd)  # what was opened, not what was looked at before
            if pending:
                _check_on_the_way(st, where, uid)
            elif not created:
                _check_own(st, where, uid, socket_dir)
    finally:
        os.close(fd)
    return path


def _make(name: str, dir_fd: int, mode: int, group: int | None) -> None:
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        return  # made meanwhile by someone: checked like any existing one
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        if group is not None:
            os.fchown(fd, -1, group)
        os.fchmod(fd, mode)  # exactly: the umask may be looser or stricter
    finally:
        os.close(fd)


def _who(st: os.stat_result) -> str:
    return f"owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"


def _check_symlink(st: os.stat_result, here: str, uid: int) -> None:
    if st.st_uid not in (0, uid):
        raise UnsafePath(
            f"{here} is a symlink owned by uid {st.st_uid}, not by root or the daemon's "
            f"user: whoever owns it chooses where the daemon's files go; remove it, or "
            f"configure a path that does not pass through it"
        )


def _check_on_the_way(st: os.stat_result, here: str, uid: int) -> None:
    if st.st_uid not in (0, uid):
        raise UnsafePath(
            f"{here} ({_who(st)}) belongs to another user, who could replace what is "
            f"inside; use a path whose every directory is root's or the daemon's"
        )
    writable = stat.S_IMODE(st.st_mode) & 0o022
    sticky = st.st_mode & stat.S_ISVTX
    if writable and not (sticky and st.st_uid == 0):
        raise UnsafePath(
            f"{here} ({_who(st)}) is writable by others, who could rename what is inside "
            f"and put their own in its place; remove the group/world write bit (chmod "
            f"go-w) or make it a root-owned sticky directory like /tmp"
        )


def _check_own(st: os.stat_result, here: str, uid: int, socket_dir: bool) -> None:
    if socket_dir and st.st_uid == 0 and st.st_mode & stat.S_ISVTX:
        return  # like /tmp: the sticky bit keeps others off the socket we bind there
    if st.st_uid != uid:
        raise UnsafePath(
            f"{here} ({_who(st)}) is not the daemon's (uid {uid}): its owner could swap "
            f"what the daemon writes there; remove it (the daemon creates its own) or "
            f"chown it to uid {uid}"
        )
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise UnsafePath(
            f"{here} ({_who(st)}) is writable by group or others, who could swap what the "
            f"daemon writes there; chmod go-w it (the daemon creates 0700, or 0750 with "
            f"socket_group)"
        )
