"""Where a worker's output goes: a pipe to its own log writer process, which rotates
numbered files by size (``logwriter.py``; the design and why in docs/logging.md).

One writer serves every run of one worker instance, from its first start until the
instance stops (``stopped``, ``exited``, ``fatal``): a crash-looping worker costs no
process start beyond its own. At the first spawn, in a worker thread, the daemon

1. opens the worker's log directory ``<log_dir>/tenants/<tenant>/`` one component at a
   time relative to the previous one, with ``O_DIRECTORY | O_NOFOLLOW`` (a symlink
   planted in place of a directory is refused, not followed);
2. checks that the log file and its lock file, if there, are regular files (not a
   symlink, FIFO, ...), so a worker whose log path was tampered with fails to start
   with the reason;
3. makes a pipe and has the writer server (``logserver.py``) fork a writer with the read
   end as its stdin and the directory as an open descriptor (or, without a server,
   starts ``logwriter.py`` on its own); each run gets the write end as stdout and stderr.

The daemon keeps its own copy of the write end while the instance may run again, and
after each run writes ``RUN_END`` into the pipe (the run's unfinished last line is
ended there, never joined with the next run's first) and waits, briefly, until the
writer has read everything: an exit is reported once the run's lines are in its files.
When the instance stops, the daemon closes its copy; the writer then sees EOF once the
worker and whatever it started are gone too, and exits. If the daemon dies, the kernel
closes its copies: each writer carries on until its worker ends, and a restarted or
re-executed daemon needs no reconnection (it starts new writers for new runs; the
files' lock lets old and new writers share a log).

Per tenant, not per name: ``a.b`` + ``c`` and ``a`` + ``b.c`` used to share
``a.b.c-0.log``; a directory per tenant (names cannot contain ``/``) keeps them apart.
The tenant directories sit under ``tenants/`` so that no tenant name can meet a file
of the daemon's own in ``log_dir`` (such as ``wasm-forkserver.log``).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import stat
import subprocess
import sys
import termios
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import structlog
import trio

from supervisord_qnx import finesleep
from supervisord_qnx.config.model import DaemonSpec, TenantSpec, WorkerBase
from supervisord_qnx.seqpacket import ServerGone
from supervisord_qnx.supervise import logwriter
from supervisord_qnx.supervise.logserver import ServerClient, WriterServer
from supervisord_qnx.supervise.reaper import ChildReaper, describe_status

log = structlog.get_logger("supervisord_qnx.logs")

WRITER = Path(logwriter.__file__)
TENANTS = "tenants"
DIR_MODE = 0o750


@dataclass(frozen=True)
class LogSettings:
    """The effective rotation settings of one worker."""

    max_size: int
    keep: int


def settings_for(daemon: DaemonSpec, tenant: TenantSpec, worker: WorkerBase) -> LogSettings:
    """A worker's ``log`` over its tenant's over the daemon's ``[daemon.log]``."""
    max_size, keep = daemon.log.max_size, daemon.log.keep
    for spec in (tenant.log, worker.log):
        if spec is not None:
            max_size = spec.max_size if spec.max_size is not None else max_size
            keep = spec.keep if spec.keep is not None else keep
    assert max_size is not None and keep is not None  # the daemon's table has both
    return LogSettings(max_size, keep)


def log_name(leaf: str) -> str:
    return f"{leaf}.log"


def log_path(log_dir: Path, tenant: str, leaf: str) -> Path:
    """The newest of a worker's log files; older ones add ``.1`` … ``.<keep>``."""
    return log_dir / TENANTS / tenant / log_name(leaf)


def open_log_dir(log_dir: Path, tenant: str) -> int:
    """A descriptor on ``<log_dir>/tenants/<tenant>``, creating what is missing; each
    component below ``log_dir`` opened without following a symlink. Blocking."""
    log_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    fd = os.open(log_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in (TENANTS, tenant):
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, DIR_MODE, dir_fd=fd)
            try:
                sub = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise OSError(
                        exc.errno, f"log directory {part!r} in {log_dir} is not a directory"
                    ) from None
                raise
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_log_file(dir_fd: int, name: str, shown: Path) -> None:
    """Refuse a log path that holds anything but a regular file; create it if missing
    (the file exists once the worker runs, as the files of a log never lack the newest).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o640, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            msg = f"log file {shown} is not a regular file (a symbolic link)"
            raise OSError(exc.errno, msg) from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO nobody reads; a directory
            raise OSError(exc.errno, f"log file {shown} is not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"log file {shown} is not a regular file")
    finally:
        os.close(fd)


@dataclass(eq=False)
class Writer:
    pid: int
    fd: int  # the daemon's copy of the pipe's write end (each run's stdout/stderr)
    lock: int  # the log's lock file, read-only: waiting for an append in progress
    done: trio.Event = field(default_factory=trio.Event)  # the writer process ended
    # The same pipe opened again, non-blocking, for the run-end mark (``end_run``); -1
    # where the pipe cannot be reopened through /proc. Its own open file description:
    # O_NONBLOCK on ``fd`` would be the workers' too.
    mark_fd: int = -1

    def __post_init__(self) -> None:
        if self.mark_fd < 0 and self.fd >= 0:
            with contextlib.suppress(OSError):
                self.mark_fd = os.open(
                    f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
                )

    @property
    def pipe_inode(self) -> int:
        """The pipe's inode: a writer's ``/proc/<pid>/fd/0`` links to ``pipe:[<inode>]``
        (what proves a writer and a worker belong together, e.g. after a restart)."""
        return os.fstat(self.fd).st_ino

    def close(self) -> None:
        """Let go of the pipe: the writer ends once the worker's processes are gone."""
        if self.fd >= 0:
            os.close(self.fd)
            os.close(self.lock)
            if self.mark_fd >= 0:
                os.close(self.mark_fd)
            self.fd = self.lock = self.mark_fd = -1


def start_writer(
    reaper: ChildReaper,
    log_dir: Path,
    tenant: str,
    leaf: str,
    settings: LogSettings,
    server: ServerClient | None = None,
) -> Writer:
    """Start the log writer of one run of a worker: forked by ``server`` when there is
    one (``logserver.py``), else an interpreter of its own. Blocking: call in a thread."""
    dir_fd = open_log_dir(log_dir, tenant)
    try:
        name = log_name(leaf)
        shown = log_path(log_dir, tenant, leaf)
        check_log_file(dir_fd, name, shown)
        check_log_file(dir_fd, name + ".lock", shown.with_name(name + ".lock"))
        lock = os.open(
            name + ".lock",
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            dir_fd=dir_fd,
        )
        read_end, write_end = os.pipe()
        try:
            if server is not None:
                pid = _fork_writer(reaper, server, read_end, dir_fd, name, settings)
                if pid is not None:
                    return Writer(pid, write_end, lock)
            argv = [
                sys.executable,
                "-I",  # no PYTHON* variables, no user site, no script dir games
                "-S",  # no site: a few MiB less per writer, and no third-party import
                str(WRITER),
                str(dir_fd),
                name,
                str(settings.max_size),
                str(settings.keep),
            ]
            with reaper.spawning():
                proc = subprocess.Popen(
                    argv,
                    stdin=read_end,
                    stdout=subprocess.DEVNULL,
                    pass_fds=(dir_fd,),
                    close_fds=True,
                    # Its own session: a signal to the daemon's process group (a
                    # terminal's ^C) does not reach it; only EOF ends it.
                    start_new_session=True,
                    cwd="/",
                    env={},
                )
                pid = reaper.adopt(proc)
        except BaseException:
            os.close(write_end)
            os.close(lock)
            raise
        finally:
            os.close(read_end)
    finally:
        os.close(dir_fd)
    return Writer(pid, write_end, lock)


def _fork_writer(
    reaper: ChildReaper,
    server: ServerClient,
    read_end: int,
    dir_fd: int,
    name: str,
    settings: LogSettings,
) -> int | None:
    """The pid of a writer forked by ``server``; ``None`` if the server is gone (the
    caller starts this one alone; the next spawn gets a new server)."""
    try:
        with reaper.spawning():
            pid = server.fork_writer(read_end, dir_fd, name, settings.max_size, settings.keep)
            reaper.register(pid)
    except ServerGone as exc:
        log.warning("log writer server unavailable; starting the writer alone", error=str(exc))
        return None
    return pid


def _end_run(fd: int, lock: int, wait: float) -> None:
    """Mark the end of a run in the pipe, then wait (at most ``wait`` seconds) until the
    writer has read everything and written it: the pipe is empty, and the append in
    progress (which holds the log's lock) is over. Blocking: the mark waits for room
    in a full pipe."""
    fionread = getattr(termios, "FIONREAD", None)
    if not _room_for_mark(fd, fionread):
        # The writer is far behind (a full disk?): the mark would block this thread until
        # it reads again. Without it a half line may join the next run's first line;
        # without the check every exit would leave a thread stuck here.
        return
    try:
        os.write(fd, logwriter.RUN_END)
    except BrokenPipeError:
        return  # the writer is gone; the next spawn starts a new one
    deadline = time.monotonic() + wait
    unread = array.array("i", [0])
    while fionread is not None and time.monotonic() < deadline:
        try:
            fcntl.ioctl(fd, fionread, unread)
        except OSError:
            return  # no FIONREAD on a pipe here: do not wait
        if unread[0] == 0:
            _wait_for_append(lock, deadline)
            return
        time.sleep(0.005)


def _room_for_mark(fd: int, fionread: int | None) -> bool:
    """Whether the pipe has room for the run-end mark now (the run's processes are gone,
    so nothing else fills it meanwhile). Where the pipe's size or fill cannot be read,
    assume room: ``end_run`` still bounds the threads that may then wait."""
    get_size = getattr(fcntl, "F_GETPIPE_SZ", None)
    if fionread is None or get_size is None:
        return True
    unread = array.array("i", [0])
    try:
        size = fcntl.fcntl(fd, get_size)
        fcntl.ioctl(fd, fionread, unread)
    except OSError:
        return True
    return size - unread[0] >= len(logwriter.RUN_END)


def _wait_for_append(lock: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            fcntl.lockf(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                return
            time.sleep(0.002)
            continue
        fcntl.lockf(lock, fcntl.LOCK_UN)
        return


async def end_run(writer: Writer, wait: float) -> None:
    if writer.fd < 0 or writer.done.is_set():
        return
    if writer.mark_fd >= 0:
        await _end_run_nonblocking(writer, wait)
        return
    with trio.move_on_after(wait + 1.0):
        # Abandoned (not cancelled) past the deadline: a writer stuck on a full disk
        # must not hold the worker's task; the thread ends when the pipe drains.
        await trio.to_thread.run_sync(
            _end_run, writer.fd, writer.lock, wait, abandon_on_cancel=True, limiter=_limiter()
        )


# How often end_run looks whether the writer has read the pipe empty (event loop): soon
# at first (a writer usually reads the mark within a fraction of a millisecond, and a
# restart waits for this), then less often, up to DRAIN_POLL. The short ones sleep on a
# timer of their own (finesleep.py): a trio sleep rounds up to a whole millisecond.
DRAIN_POLL_FIRST = 0.0002
DRAIN_POLL = 0.002


T = TypeVar("T")


async def end_run_beside(
    writer: Writer | None, wait: float, other: Callable[[], Awaitable[T]]
) -> T:
    """``end_run``, with ``other`` done while the writer reads the run's last lines: the
    mark goes in first (at once, when the pipe has room for it), then ``other`` runs, then
    the wait for the writer goes on from where it is. Both are done when this returns.
    A restart's exit reason (a /proc walk on the portable backend, a cgroup file read on
    cgroup v1) and the writer's drain were one after the other on the restart's path:
    each 0.3-2.5 ms at N = 1000 on a loaded machine (issue 14)."""
    if writer is None or writer.fd < 0 or writer.done.is_set() or writer.mark_fd < 0:
        if writer is not None:
            await end_run(writer, wait)
        return await other()
    deadline = trio.current_time() + wait
    try:
        os.write(writer.mark_fd, logwriter.RUN_END)
    except BrokenPipeError:
        return await other()  # the writer is gone
    except BlockingIOError:
        # Full: the writer is behind. The plain way, which waits for room first.
        await end_run(writer, wait)
        return await other()
    got = await other()
    await _drained(writer, deadline, DRAIN_POLL_FIRST)
    return got


async def _end_run_nonblocking(writer: Writer, wait: float) -> None:
    """``_end_run`` on the event loop, no thread: the mark goes through the non-blocking
    second opening of the pipe (a write of less than PIPE_BUF is whole or fails with
    EAGAIN, which means the pipe is full: it is tried again until the deadline, then
    skipped as ``_room_for_mark`` does), and the waits are non-blocking checks between
    sleeps. At a shutdown of 100 workers this was the difference between 100 thread hops
    through a pool of 4 and none."""
    deadline = trio.current_time() + wait
    poll = DRAIN_POLL_FIRST
    while True:
        try:
            os.write(writer.mark_fd, logwriter.RUN_END)
            break
        except BrokenPipeError:
            return  # the writer is gone
        except BlockingIOError:
            # Full: the writer is behind (a burst the run wrote just before it ended, a
            # slow rotation). Room comes as it reads; a writer stuck for longer than the
            # wait (a full disk) is given up on at the deadline, as the drain below is.
            if trio.current_time() >= deadline:
                return
            await finesleep.sleep(poll)
            poll = min(2 * poll, DRAIN_POLL)
    await _drained(writer, deadline, poll)


async def _drained(writer: Writer, deadline: float, poll: float) -> None:
    """Wait (until ``deadline``) for the writer to have read the pipe empty and finished
    appending what it read: the mark, in the pipe already, is then behind it."""
    fionread = getattr(termios, "FIONREAD", None)
    if fionread is None:
        return
    unread = array.array("i", [0])
    while trio.current_time() < deadline:
        try:
            fcntl.ioctl(writer.mark_fd, fionread, unread)
        except OSError:
            return
        if unread[0] == 0:
            break
        await finesleep.sleep(poll)
        poll = min(2 * poll, DRAIN_POLL)
    while trio.current_time() < deadline and writer.lock >= 0:
        try:
            fcntl.lockf(writer.lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                return
            await finesleep.sleep(poll)
            poll = min(2 * poll, DRAIN_POLL)
            continue
        fcntl.lockf(writer.lock, fcntl.LOCK_UN)
        return


# Threads that wait for writers at a run's end: their own few, so that writers stuck on a
# full disk can never take the threads spawns and stops run in (trio's default pool).
END_RUN_THREADS = 4
_END_RUN_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("end_run")


def _limiter() -> trio.CapacityLimiter:
    try:
        return _END_RUN_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(END_RUN_THREADS)
        _END_RUN_LIMITER.set(limiter)
        return limiter


def watch_writer(reaper: ChildReaper, writer: Writer, worker: str) -> None:
    """Collect a writer's status when its worker's output ended, and say so if it failed.
    A callback from the reaper, not a task waiting (one per running worker cost the
    daemon memory, issue 14)."""

    def ended(status: int) -> None:
        writer.done.set()
        if status != 0:
            reason = describe_status(status)
            log.warning(
                "log writer ended abnormally", worker=worker, pid=writer.pid, reason=str(reason)
            )

    reaper.on_exit(writer.pid, ended)


async def start_writer_async(
    reaper: ChildReaper,
    log_dir: Path,
    tenant: str,
    leaf: str,
    settings: LogSettings,
    server: WriterServer | None = None,
    start_time: Callable[[int], int | str | None] | None = None,
) -> tuple[Writer, int | str | None]:
    """``start_writer`` in a thread; and the writer's start time by ``start_time`` (which
    must not raise: the writer would be lost), read in the same thread (``None``: not
    read; the caller reads it). On the loop, that /proc read was a twelfth of a
    launch's event-loop time."""
    client = None if server is None else await server.ready()

    def start() -> tuple[Writer, int | str | None]:
        writer = start_writer(reaper, log_dir, tenant, leaf, settings, client)
        return writer, None if start_time is None else start_time(writer.pid)

    return await trio.to_thread.run_sync(start)
