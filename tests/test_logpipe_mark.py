"""The run-end mark when the log pipe is full at a run's end (supervise/logpipe.py).

A run that wrote a burst just before it ended leaves the pipe full while its writer
catches up (a slow rotation, a loaded machine). The mark must still go in once there is
room, within the wait, and the wait must end only when the writer has read it: else the
exit is reported before the run's last lines are in its files, and a half line can join
the next run's first. A real pipe and a reader thread that starts late stand in for the
writer process (the daemon only sees the pipe and the lock file).
"""

from __future__ import annotations

import array
import fcntl
import os
import termios
import threading
import time
from pathlib import Path

import trio

from supervisord_qnx.supervise import logpipe, logwriter


async def test_a_full_pipe_gets_its_mark_once_the_writer_reads(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    lock = os.open(tmp_path / "w.log.lock", os.O_RDONLY | os.O_CREAT, 0o600)
    writer = logpipe.Writer(pid=0, fd=write_end, lock=lock)
    assert writer.mark_fd >= 0
    os.set_blocking(writer.mark_fd, False)
    # Fill it to the last byte, as a burst can: lines while they fit, then the pages'
    # last bytes (a pipe puts a small write into the last page's room).
    for piece in (b"x" * 99 + b"\n", b"y"):
        while True:
            try:
                os.write(writer.mark_fd, piece)
            except BlockingIOError:
                break
    try:
        os.write(writer.mark_fd, logwriter.RUN_END)
    except BlockingIOError:
        pass
    else:
        raise AssertionError("the pipe was not full")
    got = bytearray()

    def late_reader() -> None:
        time.sleep(0.2)  # the writer is busy rotating
        while logwriter.RUN_END not in got:
            got.extend(os.read(read_end, 65536))

    reader = threading.Thread(target=late_reader, daemon=True)
    reader.start()
    began = time.monotonic()
    with trio.fail_after(10):
        await logpipe.end_run(writer, 1.0)
    # It waited for the writer to read (not given up at the first EAGAIN)...
    assert time.monotonic() - began >= 0.15
    reader.join(5)
    # ...and the mark went in, after the whole burst: the writer ends the run there.
    assert not reader.is_alive(), "the run-end mark never reached the pipe"
    assert got.endswith(logwriter.RUN_END)
    writer.close()
    os.close(read_end)


async def test_the_exit_reason_is_found_while_the_writer_reads_the_last_lines(
    tmp_path: Path,
) -> None:
    """``end_run_beside``: the mark goes in first, the other work (a restart's exit
    reason) runs while the writer has yet to read it, and the call returns only once the
    writer has read it, with the other work's result."""
    read_end, write_end = os.pipe()
    lock = os.open(tmp_path / "w.log.lock", os.O_RDONLY | os.O_CREAT, 0o600)
    writer = logpipe.Writer(pid=0, fd=write_end, lock=lock)
    assert writer.mark_fd >= 0
    os.write(write_end, b"last words\n")
    got = bytearray()

    def late_reader() -> None:
        time.sleep(0.2)  # the writer is slow to be scheduled
        while logwriter.RUN_END not in got:
            got.extend(os.read(read_end, 65536))

    reader = threading.Thread(target=late_reader, daemon=True)
    reader.start()
    unread_then = []

    async def exit_reason() -> str:
        # What the pipe holds while the other work runs: the last words and the mark.
        unread_then.append(_unread(read_end))
        await trio.sleep(0)
        return "signal:SIGKILL"

    began = time.monotonic()
    with trio.fail_after(10):
        reason = await logpipe.end_run_beside(writer, 1.0, exit_reason)
    assert reason == "signal:SIGKILL"
    # The other work ran with the mark already behind the last words, not after the wait.
    assert unread_then == [len(b"last words\n") + len(logwriter.RUN_END)]
    # And the call waited for the writer to read it all.
    assert time.monotonic() - began >= 0.15
    reader.join(5)
    assert bytes(got) == b"last words\n" + logwriter.RUN_END
    writer.close()
    os.close(read_end)


def _unread(fd: int) -> int:
    n = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, n)
    return n[0]
