"""The log writer: one small process per worker instance that owns the read end of
the worker's stdout/stderr pipe and the worker's numbered log files (docs/logging.md).

It is forked by the writer server (``python -I -S logwriter.py --serve FD``, see
``serve`` below and ``logserver.py``), or runs on its own as
``python -I -S logwriter.py DIR_FD NAME MAX_SIZE KEEP``; either way with the pipe as
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
import select
import signal
import stat
import sys
import time
from collections.abc import Callable

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
            self.append_held(data)

    def append_held(self, data: bytes) -> None:
        """``append`` with the lock already held by the caller."""
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
    waiter = select.poll()
    waiter.register(0, select.POLLIN)
    while True:
        # The lock is taken before the read, not after: the daemon takes a run as
        # written once the pipe reads empty and the lock is free (logpipe._drained),
        # and between a read that emptied the pipe and a lock taken for the append it
        # saw both, and reported an exit before the run's last lines were in its file.
        waiter.poll()  # data or the pipe's end (an interrupted poll is retried, PEP 475)
        with files.locked():
            chunk = os.read(0, READ_SIZE)
            if not chunk:
                out = take_lines(pending, line_max, final=True)
                if out:
                    files.append_held(out)
                return 0
            pending += chunk
            parts = []
            while (end := pending.find(RUN_END)) >= 0:
                run = pending[:end]
                del pending[: end + len(RUN_END)]
                parts.append(take_lines(run, line_max, final=True))
            parts.append(take_lines(pending, line_max))
            out = b"".join(parts)
            if out:
                files.append_held(out)


# -- the writer server: writers forked, not started -----------------------------------
#
# ``python -I -S logwriter.py --serve FD`` is started once by the daemon; it has imported
# this module already, so a writer costs two ``fork``s of a small, single-threaded process
# (no interpreter start) and shares the server's pages copy-on-write. Protocol over the
# ``SOCK_SEQPACKET`` socket ``FD`` (one datagram = one message): the server sends
# ``ready``; per request the daemon sends ``NAME\0MAX_SIZE\0KEEP`` with two descriptors
# attached (the pipe's read end, the log directory) and the server answers the writer's
# pid in decimal, or ``error: ...``. It ends at EOF (the daemon closed its end or died);
# the writers it forked carry on, they never talk to it again.
#
# Per request the writer W is made the *daemon's* child: the daemon waits for it like for
# any writer it started itself, and W is in its own session (``setsid``), so that it
# lives on through the daemon's SIGKILL exactly as a started writer does. On Linux one
# ``clone(CLONE_PARENT)`` does that: W is forked with the server's parent as its own.
# Elsewhere (QNX), or where the kernel refuses that clone, the server forks an
# intermediate, which forks W, tells the server W's pid and exits at once; the server
# reaps it before it answers, and the daemon, a child subreaper, inherits W. The second
# way costs two forks and an exit of a ~10 MiB process per writer, 4 to 5 times the
# first (bench/bench_logwriter.py): at a launch of 1000 workers the servers' forks were
# what the workers waited for.
#
# The clone is the raw system call, so the C library's fork bookkeeping does not run in
# W. What that skips is safe here because the server is single-threaded and W only
# runs ``_writer``: no lock can be held by another thread at the clone, and the
# library's cached thread id (stale in W) is used only by thread-directed calls
# (``pthread_kill``, ``raise``) that W never makes.

SERVER_READY = b"ready"
MAX_REQUEST = 4096


def serve(sock_fd: int) -> int:
    import gc
    import socket

    global _clone_parent
    sock = socket.socket(fileno=sock_fd)
    _clone_parent = _clone_parent_call()
    # What exists now lives as long as the server: the collector must never walk it in a
    # writer, which would copy its pages (gc.freeze's documented use before fork).
    gc.freeze()
    sock.send(SERVER_READY)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 2)
        except ConnectionError:
            return 0
        if not msg:
            return 0  # the daemon closed its end: it is shutting down, or gone
        try:
            try:
                if len(fds) != 2:
                    raise ValueError(f"expected a pipe and a directory, got {len(fds)} fds")
                name, max_size, keep = msg.decode().split("\0")
                answer = str(_fork_writer(fds[0], fds[1], name, int(max_size), int(keep)))
            except Exception as exc:  # noqa: BLE001 - one bad request is answered, not fatal
                answer = f"error: {type(exc).__name__}: {exc}"
            sock.send(answer.encode())
        finally:
            for fd in fds:
                os.close(fd)


# The clone system call's number, by machine; a machine not listed uses the double fork.
_CLONE_NR = {"x86_64": 56, "aarch64": 220}
_CLONE_PARENT = 0x00008000


def _clone_parent_call() -> Callable[[], int] | None:
    """A function that clones this process as a sibling (its parent is ours), returning
    0 in the clone and its pid here; ``None`` where that is not available."""
    nr = _CLONE_NR.get(os.uname().machine) if sys.platform == "linux" else None
    if nr is None:
        return None
    try:
        import ctypes
    except ImportError:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    flags = ctypes.c_long(_CLONE_PARENT | signal.SIGCHLD)
    zero = ctypes.c_long(0)

    def clone() -> int:
        pid = int(syscall(ctypes.c_long(nr), flags, zero, zero, zero, zero))
        if pid < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return pid

    return clone


# Set by ``serve`` (once per server); ``None``: the double fork.
_clone_parent: Callable[[], int] | None = None


def _fork_writer(pipe_fd: int, dir_fd: int, name: str, max_size: int, keep: int) -> int:
    global _clone_parent
    if _clone_parent is not None:
        try:
            pid = _clone_parent()
        except OSError:
            _clone_parent = None  # refused (a seccomp filter, an old kernel): fork twice
        else:
            if pid == 0:
                _writer(pipe_fd, dir_fd, name, max_size, keep)  # never returns
            return pid
    return _fork_writer_twice(pipe_fd, dir_fd, name, max_size, keep)


def _fork_writer_twice(pipe_fd: int, dir_fd: int, name: str, max_size: int, keep: int) -> int:
    r, w = os.pipe()
    try:
        a = os.fork()
        if a == 0:  # the intermediate: fork W, report its pid, leave
            code = 1
            try:
                os.close(r)
                pid = os.fork()
                if pid == 0:
                    os.close(w)
                    _writer(pipe_fd, dir_fd, name, max_size, keep)  # never returns
                os.write(w, str(pid).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        w = -1
        _, status = os.waitpid(a, 0)
        data = os.read(r, 64)
    finally:
        os.close(r)
        if w != -1:
            os.close(w)
    if status != 0 or not data.isdigit():
        raise OSError(f"the intermediate process failed (wait status {status})")
    return int(data)


def _writer(pipe_fd: int, dir_fd: int, name: str, max_size: int, keep: int) -> None:
    """W: its own session, the pipe as stdin, nothing else of the server's; then write."""
    code = 1
    try:
        os.setsid()
        os.dup2(pipe_fd, 0)
        top = max(pipe_fd, dir_fd) + 1
        for fd in range(3, top):  # the server's socket and other requests' leftovers
            if fd != dir_fd:
                try:
                    os.close(fd)
                except OSError:
                    pass
        os.closerange(top, os.sysconf("SC_OPEN_MAX"))
        code = _run_checked(dir_fd, name, max_size, keep)
    finally:
        os._exit(code)


def _run_checked(dir_fd: int, name: str, max_size: int, keep: int) -> int:
    try:
        return run(dir_fd, name, max_size, keep)
    except Refused as exc:
        print(f"supervisord-qnx log writer: refusing {exc}; stopping", file=sys.stderr)
        return EXIT_REFUSED


def main(argv: list[str]) -> int:
    # Only EOF ends the writer: a terminal's ^C, a hang-up or a stray SIGTERM to the
    # daemon's group must not cut a worker's output off while the worker still runs.
    # (The server sets the same, which its forked writers inherit.)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if len(argv) == 3 and argv[1] == "--serve":
        return serve(int(argv[2]))
    try:
        dir_fd, name, max_size, keep = int(argv[1]), argv[2], int(argv[3]), int(argv[4])
    except (IndexError, ValueError):
        print("usage: logwriter.py DIR_FD NAME MAX_SIZE KEEP | --serve FD", file=sys.stderr)
        return 2
    return _run_checked(dir_fd, name, max_size, keep)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
