"""Readiness and watchdog below the daemon: the readiness keys as the config loader
checks them, and the wasm runner's ``supervisord.ready``/``watchdog``/``status`` imports,
run for real:
the runner as its own process, with ``NOTIFY_SOCKET`` naming a datagram socket bound
here (as the daemon binds one per worker), read with ``SO_PASSCRED`` to see who sent
each message. The daemon's side is in ``test_daemon_notify.py``."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisord_qnx.config.load import ConfigError, load

CREDS = struct.Struct("3i")

# Calls status (two lines of text), ready, watchdog, and status with a pointer past the
# memory; exits with the four answers (-1/0/1) as base-3 digits, so the test reads them.
SIGNALS_WAT = """
(module
  (import "supervisord" "ready" (func $ready (result i32)))
  (import "supervisord" "watchdog" (func $watchdog (result i32)))
  (import "supervisord" "status" (func $status (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "line one\\0aline two")
  (func $digit (param $answer i32) (param $weight i32) (result i32)
    (i32.mul (i32.add (local.get $answer) (i32.const 1)) (local.get $weight)))
  (func (export "_start")
    (call $exit
      (i32.add
        (i32.add (call $digit (call $status (i32.const 16) (i32.const 17)) (i32.const 1))
                 (call $digit (call $ready) (i32.const 3)))
        (i32.add (call $digit (call $watchdog) (i32.const 9))
                 (call $digit (call $status (i32.const 70000) (i32.const 4)) (i32.const 27)))))))
"""


def answers(code: int) -> list[int]:
    """The four answers (status, ready, watchdog, bad status) from the exit code."""
    return [(code // 3**i) % 3 - 1 for i in range(4)]


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    path = f"/tmp/sqnx-wn-{uuid.uuid4().hex[:10]}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(path)
    sock.settimeout(10)
    yield sock, path
    sock.close()
    os.unlink(path)


def run_runner(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    module = tmp_path / "signals.wat"
    module.write_text(SIGNALS_WAT)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supervisord_qnx.wasm.runner",
            "--module",
            str(module),
            "--no-cache",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_imports_send_sd_notify_messages_from_the_runner_process(
    tmp_path: Path, listener: tuple[socket.socket, str]
) -> None:
    sock, path = listener
    proc = run_runner(tmp_path, {**os.environ, "NOTIFY_SOCKET": path})
    _, err = proc.communicate(timeout=60)
    assert answers(proc.returncode) == [1, 1, 1, -1], err
    got = []
    for _ in range(3):
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(CREDS.size))
        (pid,) = [CREDS.unpack(p[: CREDS.size])[0] for _, _, p in ancillary]
        got.append((data.decode(), pid))
    # One line of STATUS= (a newline would start a new assignment), then the two pings,
    # each from the runner itself: the process the daemon finds in the worker's leaf.
    assert got == [
        ("STATUS=line one line two", proc.pid),
        ("READY=1", proc.pid),
        ("WATCHDOG=1", proc.pid),
    ]


def test_imports_answer_zero_without_a_notify_socket(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    proc = run_runner(tmp_path, env)
    _, err = proc.communicate(timeout=60)
    assert answers(proc.returncode) == [0, 0, 0, -1], err


# -- the keys, as an operator writes them ------------------------------------------------


def test_readiness_keys_are_checked_where_they_are_written(tmp_path: Path) -> None:

    (tmp_path / "tenants.d").mkdir()
    (tmp_path / "tenants.d" / "t.toml").write_text(
        '[[worker]]\nname = "a"\ncommand = ["true"]\nready = "listening"\n'
        '[[worker]]\nname = "b"\ncommand = ["true"]\nwatchdog = 0\nstart_timeout = -1\n'
        '[[worker]]\nname = "c"\ncommand = ["true"]\nready = "notify"\nwatchdog = 2.5\n'
    )
    daemon = tmp_path / "d.toml"
    daemon.write_text('[[partition]]\nname = "tenants"\nflags = ["hierarchical"]\n')
    with pytest.raises(ConfigError) as info:
        load(daemon)
    lines = sorted(
        str(p).removeprefix(f"{tmp_path}/tenants.d/t.toml: ") for p in info.value.problems
    )
    assert [line.split(":")[0] for line in lines] == [
        "worker[0].ready",
        "worker[1].start_timeout",
        "worker[1].watchdog",
    ]
    assert "'started' or 'notify'" in lines[0]
    # Fixed, the same file loads: notify with a watchdog, the defaults elsewhere.
    text = (tmp_path / "tenants.d" / "t.toml").read_text()
    text = text.replace('ready = "listening"', "").replace("watchdog = 0\nstart_timeout = -1", "")
    (tmp_path / "tenants.d" / "t.toml").write_text(text)
    a, _, c = load(daemon).tenants[0].worker
    assert (a.ready, a.start_timeout, a.watchdog, a.uses_notify) == ("started", 90.0, None, False)
    assert (c.ready, c.watchdog, c.uses_notify) == ("notify", 2.5, True)


def test_descriptors_a_worker_sends_arrive_close_on_exec_and_are_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers are spawned without a close loop (fdhygiene.py): a descriptor a worker
    # passes over its notify socket must never be inheritable, not even between its
    # arrival and its close, or a worker spawned by another thread meanwhile gets it.
    from supervisord_qnx.supervise import notify

    endpoint = notify.NotifyDir(tmp_path).endpoint()
    r, w = os.pipe()
    os.set_inheritable(r, True)  # the sender's copy: inheritable, as a worker's may be
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sender.connect(endpoint.path)
        socket.send_fds(sender, [b"READY=1"], [r])
        seen: list[tuple[int, bool]] = []
        real_close = os.close

        def watching_close(fd: int) -> None:
            with contextlib.suppress(OSError):
                seen.append((fd, os.get_inheritable(fd)))
            real_close(fd)

        monkeypatch.setattr(os, "close", watching_close)
        got = endpoint._receive()
        monkeypatch.undo()
        assert got is not None and got[0] == b"READY=1"
        assert len(seen) == 1, seen
        fd, inheritable = seen[0]
        assert not inheritable
        with pytest.raises(OSError):
            os.fstat(fd)  # closed: the daemon keeps nothing a worker sends
    finally:
        sender.close()
        endpoint.sock.close()
        os.close(r)
        os.close(w)
