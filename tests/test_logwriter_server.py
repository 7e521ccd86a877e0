"""The log writer server's two ways of making a writer the daemon's child
(supervise/logwriter.py, "the writer server"): one ``clone(CLONE_PARENT)`` on Linux, and
the double fork it falls back to (QNX, or a kernel that refuses the clone).

Each test plays the daemon's part with a real server process over a real socketpair,
and checks what the daemon relies on: the pid answered is *its own child* (it can wait
for it), and that writer copies the worker's lines into the log and ends at EOF.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supervisord_qnx.supervise import logwriter

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="CLONE_PARENT is Linux's")

# The daemon's side of one request, as logserver.ServerClient makes it, in a process of its
# own: with ``SUBREAPER`` it is a child subreaper as the daemon is; ``FORCE_TWICE`` starts
# the server with the clone unavailable, as on QNX.
DAEMON_SIDE = textwrap.dedent(
    """
    import ctypes, os, socket, subprocess, sys
    writer_py, log_dir, subreaper, force_twice = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:5])
    if subreaper:
        assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    boot = (
        "import sys; sys.path.insert(0, sys.argv[1]); import logwriter as lw\\n"
        + ("lw._clone_parent_call = lambda: None\\n" if force_twice else "")
        + "sys.exit(lw.main(['logwriter.py', '--serve', sys.argv[2]]))"
    )
    server = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", boot, os.path.dirname(writer_py), str(theirs.fileno())],
        pass_fds=(theirs.fileno(),), env={},
    )
    theirs.close()
    assert ours.recv(64) == b"ready"
    read_end, write_end = os.pipe()
    dir_fd = os.open(log_dir, os.O_RDONLY | os.O_DIRECTORY)
    socket.send_fds(ours, [b"w.log\\0" + b"1048576\\0" + b"2"], [read_end, dir_fd])
    reply = ours.recv(4096)
    os.close(read_end)
    assert reply.isdigit(), reply
    pid = int(reply)
    os.write(write_end, b"hello from the worker\\n")
    os.close(write_end)  # EOF: the writer ends
    try:
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    except ChildProcessError:
        print("not my child")
    ours.close()
    server.wait(30)
    """
)


def daemon_side(tmp_path: Path, *, subreaper: bool, force_twice: bool) -> str:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            DAEMON_SIDE,
            logwriter.__file__,
            str(tmp_path),
            str(int(subreaper)),
            str(int(force_twice)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


def test_a_cloned_writer_is_the_daemons_child_without_any_reparenting(tmp_path: Path) -> None:
    # Not a subreaper: only a writer created with the server's parent as its own can be
    # waited for here (the double fork would leave it to init).
    assert daemon_side(tmp_path, subreaper=False, force_twice=False) == "child 0"
    assert (tmp_path / "w.log").read_text() == "hello from the worker\n"


def test_without_the_clone_the_double_fork_hands_the_writer_to_a_subreaper(
    tmp_path: Path,
) -> None:
    assert daemon_side(tmp_path, subreaper=True, force_twice=True) == "child 0"
    assert (tmp_path / "w.log").read_text() == "hello from the worker\n"
