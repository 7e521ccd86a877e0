"""The log writer: one small process per worker instance that owns the read end of
the worker's stdout/stderr pipe and the worker's numbered log files (docs/logging.md).

It runs as ``python -I -S logwriter.py DIR_FD NAME MAX_SIZE KEEP`` with the pipe as
its stdin and the worker's log directory as the open descriptor ``DIR_FD``; it imports
the standard library only (no site, no package), which keeps it small (RSS is
measured in docs/logging.md) and lets it outlive the daemon: nothing in it talks to
the daemon, so a SIGKILLed or re-executing daemon costs it nothing. It ends at EOF,
that is when the daemon let go of the pipe's write end (the instance stopped, or the
daemon is gone) and the worker and everything that inherited it are gone too.

The rules it keeps:

* **Whole lines only.** Bytes read from the pipe are cut at the last newline; the
  rest waits for the next read. A file therefore always starts and ends at a line
  boundary, and rotation never tears a line.
* **Bounded.** Every file is at most ``MAX_SIZE`` bytes: a batch that would overflow
  ``NAME`` is split at its last line that fits, ``NAME`` is rotated (``NAME.1`` …
  ``NAME.KEEP``, the oldest dropped) and the rest goes to the fresh file. So the
  files of one worker never hold more than ``MAX_SIZE * (KEEP + 1)`` bytes.
* **Long lines.** A line longer than ``min(MAX_SIZE, 64 KiB)`` bytes is written in
  pieces of that size, each but the last ending in ``CONTINUES`` and a newline; a
  final line without a newline (the worker died mid-line) gets one.
* **Nothing lost.** The writer never drops bytes: when the disk is full it retries
  every second, and the worker blocks on its full pipe meanwhile (back-pressure, as
  s6-log). Nothing else reads the pipe, so a worker's lines reach its files in order.
* **Several writers, one log.** An instance started again after a stop gets a new
  writer while the previous one may still be draining (a grandchild still holding
  the pipe), and a daemon restarted while a worker ran starts new writers beside the
  old one still serving that worker. Each append holds an exclusive ``lockf`` lock on
  ``NAME.lock`` and re-checks that its descriptor is still ``NAME`` (another writer
  may have rotated it), so the size bound and the rotation hold with any number of
  writers, and their batches of whole lines never interleave inside a line.
* **No symlinks.** Every file is opened relative to ``DIR_FD`` with ``O_NOFOLLOW``
  (and ``O_NONBLOCK``, so a FIFO planted there cannot block the open) and used only
  if it is a regular file; renames and unlinks never follow links either. A symlink
  or anything else planted at ``NAME`` stops the writer (exit 3) rather than
  redirecting a single byte; the worker then gets ``EPIPE`` and the daemon's next
  start of it fails with the reason.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import sys
import time

READ_SIZE = 256 * 1024
LINE_MAX = 64 * 1024
CONTINUES = b" [line continues]\n"
# Written into the pipe by the daemon after a run of the worker ended (the writer
# serves every run of one worker instance): an unfinished last line of that run is
# ended here, so it is never joined with the next run's first line. A worker that
# writes these bytes itself only ends its own line early.
RUN_END = b"\x00\x1esupervisord-qnx run ended\x1e\x00"
EXIT_REFUSED = 3


class Refused(Exception):
    """Something other than a regular file sits at a log path."""


def open_regular(name: str, dir_fd: int, flags: int) -> int:
    """Open ``name`` in ``dir_fd`` without following a symlink; only a regular file."""
    try:
        fd = os.open(
            name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o640, dir_fd=dir_fd
        )
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise Refused(f"{name} is not a regular file: {os.strerror(exc.errno)}") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused(f"{name} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def take_lines(buf: bytearray, line_max: int, final: bool = False) -> bytes:
    """Remove from ``buf`` and return what can be written now: its whole lines, with
    any line longer than ``line_max`` cut into ``line_max``-byte pieces ending in
    ``CONTINUES``. A shorter unfinished line stays in ``buf`` unless ``final``."""
    piece = line_max - len(CONTINUES)
    parts: list[bytes | bytearray] = []
    n = len(buf)
    run = start = 0  # buf[run:start] is a run of whole, short-enough lines
    while start < n:
        # Any line that ends inside this window is at most line_max bytes long.
        q = buf.rfind(b"\n", start, min(n, start + line_max))
        if q >= 0:
            start = q + 1
            continue
        if n - start < line_max:
            break  # an unfinished line, still short: wait for the rest
        parts += (buf[run:start], buf[start : start + piece], CONTINUES)
        start += piece
        run = start
    parts.append(buf[run:start])
    if final and start < n:
        parts += (buf[start:], b"\n")
        start = n
    del buf[:start]
    return b"".join(parts)


class Files:
    """The numbered files of one log: ``name``, ``name.1`` … ``name.<keep>``."""

    def __init__(self, dir_fd: int, name: str, max_size: int, keep: int) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self.max_size = max_size
        self.keep = keep
        self.fd = -1
        self.lock = open_regular(name + ".lock", dir_fd, os.O_RDWR | os.O_CREAT)

    def prune(self) -> None:
        """Drop numbered files beyond ``keep`` (left by a config that kept more)."""
        prefix = self.name + "."
        with self.locked():
            for entry in os.listdir(self.dir_fd):
                suffix = entry[len(prefix) :] if entry.startswith(prefix) else ""
                if suffix.isdigit() and int(suffix) > self.keep:
                    try:
                        os.unlink(entry, dir_fd=self.dir_fd)
                    except FileNotFoundError:
                        pass

    def locked(self) -> _Locked:
        return _Locked(self.lock)

    def _current_size(self) -> int:
        """Size of ``name`` with ``self.fd`` open on it (re-opened if another writer
        rotated it away since the last append)."""
        try:
            there = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            there = None
        if self.fd >= 0:
            mine = os.fstat(self.fd)
            if there is not None and (there.st_ino, there.st_dev) == (mine.st_ino, mine.st_dev):
                return mine.st_size
            os.close(self.fd)
            self.fd = -1
        self.fd = open_regular(self.name, self.dir_fd, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return os.fstat(self.fd).st_size

    def _rotate(self) -> None:
        os.close(self.fd)
        self.fd = -1
        d = self.dir_fd
        try:
            if self.keep == 0:
                os.unlink(self.name, dir_fd=d)
            # Oldest first, so that every rename lands on a name just vacated (or on the
            # oldest, which it replaces): a writer killed half-way leaves a gap, never a
            # lost newer file.
            for i in range(self.keep, 0, -1):
                src = self.name if i == 1 else f"{self.name}.{i - 1}"
                try:
                    os.rename(src, f"{self.name}.{i}", src_dir_fd=d, dst_dir_fd=d)
                except FileNotFoundError:
                    pass
        except FileNotFoundError:
            pass
        self.fd = open_regular(self.name, d, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def append(self, data: bytes) -> None:
        """Append whole lines (each at most ``max_size`` bytes), rotating as needed."""
        with self.locked():
            size = self._current_size()
            view = memoryview(data)
            start = 0
            while start < len(data):
                room = self.max_size - size
                if len(data) - start <= room:
                    end = len(data)
                else:
                    end = data.rfind(b"\n", start, start + max(0, room)) + 1
                    if end <= start and size == 0:  # cannot happen: lines fit a file
                        end = data.index(b"\n", start) + 1
                if end <= start:
                    self._rotate()
                    size = 0
                    continue
                _write_all(self.fd, view[start:end])
                size += end - start
                start = end


class _Locked:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # Never drop a line: wait for room; the worker blocks on its pipe.
                time.sleep(1.0)
                continue
            raise
        data = data[n:]


def run(dir_fd: int, name: str, max_size: int, keep: int) -> int:
    line_max = min(LINE_MAX, max_size)
    files = Files(dir_fd, name, max_size, keep)
    files.prune()
    pending = bytearray()
    while True:
        chunk = os.read(0, READ_SIZE)
        if not chunk:
            break
        pending += chunk
        parts = []
        while (end := pending.find(RUN_END)) >= 0:
            run = pending[:end]
            del pending[: end + len(RUN_END)]
            parts.append(take_lines(run, line_max, final=True))
        parts.append(take_lines(pending, line_max))
        out = b"".join(parts)
        if out:
            files.append(out)
    out = take_lines(pending, line_max, final=True)
    if out:
        files.append(out)
    return 0


def main(argv: list[str]) -> int:
    # Only EOF ends the writer: a terminal's ^C, a hang-up or a stray SIGTERM to the
    # daemon's group must not cut a worker's output off while the worker still runs.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        dir_fd, name, max_size, keep = int(argv[1]), argv[2], int(argv[3]), int(argv[4])
    except (IndexError, ValueError):
        print("usage: logwriter.py DIR_FD NAME MAX_SIZE KEEP", file=sys.stderr)
        return 2
    try:
        return run(dir_fd, name, max_size, keep)
    except Refused as exc:
        print(f"supervisord-qnx log writer: refusing {exc}; stopping", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main(sys.argv))
