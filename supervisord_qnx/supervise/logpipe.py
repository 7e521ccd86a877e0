"""Where a worker's output goes: a pipe to its own log writer process, which rotates
numbered files by size (``logwriter.py``; the design and why in docs/logging.md).

The daemon's part is small and happens at each spawn, in a worker thread:

1. open the worker's log directory ``<log_dir>/tenants/<tenant>/`` one component at a
   time relative to the previous one, with ``O_DIRECTORY | O_NOFOLLOW`` (a symlink
   planted in place of a directory is refused, not followed);
2. check that the log file, if there, is a regular file (not a symlink, FIFO, ...),
   so a worker whose log path was tampered with fails to start with the reason;
3. make a pipe, start the writer with the read end as its stdin and the directory as
   an inherited descriptor, and hand the write end to the worker as stdout/stderr.

The daemon then closes both ends: from here on only the worker (and whatever it
starts) holds the write end, so the writer sees EOF exactly when the last of them is
gone. Nothing ties the writer to the daemon: a dead, restarted or re-executed daemon
needs no reconnection; an adopted worker keeps writing to its old writer.

Per tenant, not per name: ``a.b`` + ``c`` and ``a`` + ``b.c`` used to share
``a.b.c-0.log``; a directory per tenant (names cannot contain ``/``) keeps them apart.
The tenant directories sit under ``tenants/`` so that no tenant name can meet a file
of the daemon's own in ``log_dir`` (such as ``wasm-forkserver.log``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from supervisord_qnx.config.model import DaemonSpec, TenantSpec, WorkerBase
from supervisord_qnx.supervise import logwriter
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

    @property
    def bound(self) -> int:
        """The most its files together may hold."""
        return self.max_size * (self.keep + 1)


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
    """Refuse a log path that holds anything but a regular file (or nothing)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, f"log file {shown} is not a regular file (a symbolic link)")
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, f"log file {shown} is not a regular file")


@dataclass
class Writer:
    pid: int
    fd: int  # the pipe's write end: the worker's stdout/stderr, closed by the caller


def start_writer(
    reaper: ChildReaper, log_dir: Path, tenant: str, leaf: str, settings: LogSettings
) -> Writer:
    """Start the log writer of one run of a worker. Blocking: call in a thread."""
    dir_fd = open_log_dir(log_dir, tenant)
    try:
        name = log_name(leaf)
        shown = log_path(log_dir, tenant, leaf)
        check_log_file(dir_fd, name, shown)
        check_log_file(dir_fd, name + ".lock", shown.with_name(name + ".lock"))
        read_end, write_end = os.pipe()
        try:
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
            raise
        finally:
            os.close(read_end)
    finally:
        os.close(dir_fd)
    return Writer(pid, write_end)


async def reap_writer(reaper: ChildReaper, pid: int, worker: str, done: trio.Event) -> None:
    """Collect a writer's status when its worker's output ended; say so if it failed."""
    try:
        status = await reaper.wait(pid)
    finally:
        done.set()
    if status != 0:
        reason = describe_status(status)
        log.warning("log writer ended abnormally", worker=worker, pid=pid, reason=str(reason))


async def start_writer_async(
    reaper: ChildReaper, log_dir: Path, tenant: str, leaf: str, settings: LogSettings
) -> Writer:
    return await trio.to_thread.run_sync(start_writer, reaper, log_dir, tenant, leaf, settings)
