"""The real daemon's control socket: its file mode, its message size limit, and the trio
I/O back end it actually runs on.

``test_control_server.py`` covers the server against a toy method table; these check
that the daemon passes its own settings through (``socket_mode``, ``max_message_bytes``)
and that ``SUPERVISORD_QNX_IO=poll`` is what trio runs, not just what the daemon says.
Marked ``integration``, so CI runs them twice: with trio's native back end and with the
poll(2) one.
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest
import trio

from supervisord_qnx.control.client import Client
from supervisord_qnx.control.rpc import ErrorCode, RpcError, encode_request
from tests.conftest import IO_BACKEND, ConfigDir, cli_env, wait_until, worker_py
from tests.daemonproc import DaemonProc
from tests.test_control_server import Raw

pytestmark = pytest.mark.integration

# What ``trio.lowlevel.current_statistics().io_statistics.backend`` says for each choice
# of ``SUPERVISORD_QNX_IO`` on Linux.
TRIO_BACKEND = {"poll": "poll", "native": "epoll"}

SLEEPY = worker_py("import time\nwhile True: time.sleep(1)")


def sleepy_tenant(cfg: ConfigDir, instances: int = 1) -> str:
    # Unique per test: the portable backend finds a leaf's processes by their
    # environment tag, system-wide, so equal names in parallel runs would collide.
    name = f"sock-{uuid.uuid4().hex[:6]}"
    cfg.tenant(
        name,
        f"""
        [[worker]]
        name = "w"
        instances = {instances}
        command = {SLEEPY}
        """,
    )
    return name


def socket_mode(path: Path) -> int:
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode), path
    return stat.S_IMODE(st.st_mode)


# -- the socket file -------------------------------------------------------------------


async def test_socket_is_private_by_default(cfg: ConfigDir, start_daemon) -> None:
    sleepy_tenant(cfg)
    await start_daemon()
    assert socket_mode(cfg.socket) == 0o600


async def test_socket_mode_from_the_config_is_applied(cfg: ConfigDir, start_daemon) -> None:
    sleepy_tenant(cfg)
    d = await start_daemon(socket_mode=0o660)
    assert socket_mode(cfg.socket) == 0o660
    assert await d.call("ping") == "pong"


# -- the size limit --------------------------------------------------------------------

LIMIT = 1024  # the smallest max_message_bytes the config accepts


async def test_oversized_request_is_answered_too_large_then_closed(
    cfg: ConfigDir, start_daemon
) -> None:
    sleepy_tenant(cfg)
    d = await start_daemon(max_message_bytes=LIMIT)
    raw = await Raw.open(cfg.socket)
    await raw.send(encode_request(42, "status", {"tenant": "x" * (LIMIT + 10)}))
    [response] = await raw.until_closed()
    assert response.msgid == 42
    assert response.error is not None and response.error.code is ErrorCode.TOO_LARGE
    assert f"{LIMIT}-byte size limit" in response.error.message
    # Only that connection was closed.
    assert await d.call("ping") == "pong"


async def test_oversized_garbage_is_closed_without_an_answer(cfg: ConfigDir, start_daemon) -> None:
    sleepy_tenant(cfg)
    d = await start_daemon(max_message_bytes=LIMIT)
    raw = await Raw.open(cfg.socket)
    # A str32 header declaring 1 MiB: no message head to answer to.
    await raw.send(b"\xdb\x00\x10\x00\x00" + b"x" * (LIMIT + 10))
    assert await raw.until_closed() == []
    assert await d.call("ping") == "pong"


async def test_oversized_result_is_too_large_and_the_connection_goes_on(
    cfg: ConfigDir, start_daemon
) -> None:
    sleepy_tenant(cfg, instances=12)  # a status of 12 workers is over 1 KiB, whatever state
    await start_daemon(max_message_bytes=LIMIT)

    def calls() -> None:
        with Client(cfg.socket, timeout=10) as client:
            with pytest.raises(RpcError) as info:
                client.call("status")
            assert info.value.code is ErrorCode.TOO_LARGE
            assert "ask for less" in info.value.message
            # The same connection still answers a small request.
            assert client.call("ping") == "pong"

    await trio.to_thread.run_sync(calls)


# -- the I/O back end -----------------------------------------------------------------


async def test_trio_runs_the_io_back_end_the_run_asked_for(cfg: ConfigDir, start_daemon) -> None:
    # The in-process daemon shares this trio run: ask trio which I/O manager it runs,
    # not the daemon which label it was given.
    wanted = os.environ.get("SUPERVISORD_QNX_IO", "") or "native"
    assert wanted == IO_BACKEND
    assert trio.lowlevel.current_statistics().io_statistics.backend == TRIO_BACKEND[wanted]
    sleepy_tenant(cfg)
    d = await start_daemon()
    assert (await d.call("version"))["io"] == wanted


def epoll_fds(pid: int) -> int:
    """How many epoll instances the process holds open (trio's native Linux back end
    keeps exactly one; the poll(2) back end none)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventpoll]":
                count += 1
        except FileNotFoundError:
            pass  # closed while we looked
    return count


@pytest.mark.parametrize("io", ["poll", "native"])
def test_subprocess_daemon_runs_on_the_io_back_end_it_reports(
    cfg: ConfigDir, monkeypatch: pytest.MonkeyPatch, io: str
) -> None:
    monkeypatch.setenv("SUPERVISORD_QNX_IO", io)
    sleepy_tenant(cfg)
    cfg.write()
    assert cli_env()["SUPERVISORD_QNX_IO"] == io
    d = DaemonProc(cfg)
    try:
        with Client(cfg.socket, timeout=10) as c:
            assert c.call("version")["io"] == io
        # Seen from outside: an epoll instance exists exactly when trio runs on epoll.
        wait_until(lambda: epoll_fds(d.proc.pid) == (io == "native"), 5, "the epoll fd count")
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=30)
