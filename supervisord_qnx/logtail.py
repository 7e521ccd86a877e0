"""The end of a worker's log file, read safely and in bounded work (the ``logs`` method).

A tenant writes its own log, so everything about the file is hostile input:

* **What is at the path.** The file is opened with ``O_NOFOLLOW`` (a symlink planted at
  the path is refused, not followed to some other file), ``O_NONBLOCK`` (a FIFO there
  opens at once instead of waiting for a writer) and ``O_CLOEXEC``, then refused unless
  ``fstat`` says it is a regular file. Callers run this in a worker thread, never on the
  event loop.
* **How long a line is.** A line longer than ``max_line`` bytes is shown as its last
  ``max_line`` bytes behind a marker (``TRUNCATED``), and reading backwards (a block at
  a time) stops as soon as the earliest line seen is that long: it is then the
  earliest line returned, and fewer lines than asked may come back. Work is therefore
  at most what is returned plus one ``max_line`` and one block, whatever the file
  holds: a 20 MB line costs two 64 KiB reads.
* **How much in total.** ``budget`` bytes at most are read; the earliest line returned
  then is cut the same way. The daemon sizes the budget to fit the reply in one message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path

BLOCK = 64 * 1024
MAX_LINE = 64 * 1024
# Put in front of a line shown only in part: what follows is the line's end.
TRUNCATED = "[…truncated] "


class NotRegular(Exception):
    """The path holds something other than a regular file; ``str()`` says what."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path) -> int | None:
    """An fd for reading the regular file at ``path``; ``None`` if there is no file.

    Raises ``NotRegular`` for a symlink, FIFO, device, ...; never blocks on one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegular(f"{path} is a symbolic link; log files are never followed") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegular(f"{path} is {_kind(mode)}, not a regular file; it is not read")
    return fd


def tail_fd(fd: int, lines: int, *, budget: int, max_line: int = MAX_LINE) -> list[str]:
    """The last ``lines`` lines of the open file ``fd`` (see the module docstring)."""
    max_line = max(1, min(max_line, budget))
    pos = os.fstat(fd).st_size
    chunks: list[bytes] = []  # newest first; joined once at the end (no quadratic prepend)
    newlines = 0
    earliest = 0  # length of the earliest (so far incomplete) line read
    read = 0
    last_byte_seen = False
    ends_with_newline = False
    restarts = 3  # the worker holds the file open for writing and may truncate it
    while pos > 0 and read < budget:
        n = min(BLOCK, pos, budget - read)
        chunk = os.pread(fd, n, pos - n)
        if len(chunk) != n:  # the file shrank under us: start again from its new end
            restarts -= 1
            pos = os.fstat(fd).st_size if restarts > 0 else 0
            chunks, newlines, earliest, read, last_byte_seen = [], 0, 0, 0, False
            continue
        pos -= n
        read += n
        if not last_byte_seen:
            ends_with_newline = chunk.endswith(b"\n")
            last_byte_seen = True
        chunks.append(chunk)
        count = chunk.count(b"\n")
        newlines += count
        earliest = (earliest + n) if count == 0 else chunk.index(b"\n")
        # Enough when the earliest wanted line is known to be whole: one newline more than
        # lines, not counting the file's final one.
        if newlines - int(ends_with_newline) >= lines:
            break
        if earliest > max_line:
            break
    data = b"".join(reversed(chunks))
    if not data:
        return []
    pieces = data.split(b"\n")
    if ends_with_newline:
        pieces.pop()  # the final newline ends the last line; it does not start an empty one
    # The first piece is whole only if the read reached the start of the file or stopped
    # right after a newline.
    first_whole = pos == 0 or _byte_before(fd, pos) == b"\n"
    start = max(0, len(pieces) - lines)
    out = []
    for i in range(start, len(pieces)):
        piece = pieces[i]
        cut = (i == 0 and not first_whole) or len(piece) > max_line
        text = piece[-max_line:].decode("utf-8", "replace")
        out.append(TRUNCATED + text if cut else text)
    return out


def _byte_before(fd: int, pos: int) -> bytes:
    return os.pread(fd, 1, pos - 1) if pos > 0 else b""


def tail(path: Path, lines: int, *, budget: int, max_line: int = MAX_LINE) -> list[str]:
    """The last ``lines`` lines of the log at ``path`` (``[]`` if there is none yet)."""
    fd = open_regular(path)
    if fd is None:
        return []
    try:
        return tail_fd(fd, lines, budget=budget, max_line=max_line)
    finally:
        os.close(fd)


def tail_rotated(path: Path, keep: int, lines: int, *, budget: int) -> list[str]:
    """The last ``lines`` lines of a rotated log: ``path`` (newest), then ``path.1`` …
    ``path.<keep>`` as far back as needed, oldest line first.

    The log writer writes whole lines only, so every file starts at a line boundary
    and the tails of consecutive files join without a seam. The files are read under
    a shared lock on ``path.lock`` (the writer rotates under the exclusive one), so a
    rotation during the call cannot show a file twice or skip one; the writers wait
    for at most what the budget lets this call read. One file is open at a time.
    """
    lock = _lock_shared(path.with_name(path.name + ".lock"))
    try:
        out: list[str] = []
        for i in range(keep + 1):
            if len(out) >= lines or budget <= 0:
                break
            fd = open_regular(path if i == 0 else path.with_name(f"{path.name}.{i}"))
            if fd is None:
                if i == 0:
                    continue  # the writer is between a rotation's rename and its create
                break  # numbered files are contiguous: a gap means nothing older
            try:
                size = os.fstat(fd).st_size
                out[:0] = tail_fd(fd, lines - len(out), budget=budget)
            finally:
                os.close(fd)
            budget -= min(size, budget)
        return out
    finally:
        if lock is not None:
            os.close(lock)  # closing the descriptor drops the lock


def _lock_shared(path: Path) -> int | None:
    """The shared lock on a log's lock file, or ``None`` if there is none or the writer
    holds it for longer than a second (then the read goes on unlocked: a tail that may
    straddle a rotation beats a ``logs`` call stuck behind a full disk)."""
    try:
        fd = open_regular(path)
    except NotRegular:
        return None
    if fd is None:
        return None
    for _ in range(100):
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                break
            time.sleep(0.01)
    os.close(fd)
    return None
