"""The control server's limits against the attacks they exist for (issue 13): memory
amplification by a small message, slowloris, connection floods, a budget exhausted by
many connections at once. Each time a well-behaved client on another connection must
keep getting answers.

Most run against the server with a toy method table (``test_control_server.py``); the
amplification attack also runs against the real daemon in its own process, whose peak
RSS is read from /proc.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisord_qnx.control.client import AsyncClient, Client, ConnectionLost
from supervisord_qnx.control.rpc import (
    ErrorCode,
    InvalidMessage,
    ProtocolError,
    RpcConnection,
    _deeper_than,
    encode_request,
)
from tests.conftest import ConfigDir
from tests.test_control_server import Raw, in_thread, start_server

pytestmark = pytest.mark.integration


def request_head(msgid: int, method: str) -> bytes:
    """``[0, msgid, method, [`` : a request whose params array the caller completes."""
    return b"\x94\x00" + msgpack.packb(msgid) + msgpack.packb(method) + b"\x91"


def million_empty_arrays(msgid: int) -> bytes:
    """The issue's attack: params hold an array32 of a million empty arrays (1 MB of
    msgpack; about 64 MB once decoded into Python lists)."""
    return (
        request_head(msgid, "echo") + b"\xdd" + struct.pack(">I", 1_000_000) + b"\x90" * 1_000_000
    )


def many_small_arrays(msgid: int, outer: int, inner: int) -> bytes:
    """A well-formed request (``echo {"a": [...]}``) whose argument holds arrays each
    small enough for their own header check, many in all."""
    one = b"\xdc" + struct.pack(">H", inner) + b"\x90" * inner
    argument = b"\x81\xa1a\xdc" + struct.pack(">H", outer) + one * outer
    return request_head(msgid, "echo") + argument


async def send_until_closed(raw: Raw, data: bytes) -> None:
    """Send what the server may stop reading half-way (it answers and closes)."""
    try:
        await raw.send(data)
    except trio.BrokenResourceError:
        pass


async def well_behaved(path: Path) -> None:
    """A client that must still be answered, and promptly, whatever the others do."""
    async with AsyncClient(path) as client:
        with trio.fail_after(10):
            assert await client.call("echo", ok=1) == {"ok": 1}


# -- what one message may decode into --------------------------------------------------


async def test_a_million_empty_arrays_are_refused_at_the_header(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_server(
        nursery, tmp_path / "c.sock", max_message_bytes=2 << 20, max_elements=100_000
    )
    raw = await Raw.open(server.path)
    await send_until_closed(raw, million_empty_arrays(7))
    [answer] = await raw.until_closed()
    assert answer.msgid == 7 and answer.error is not None
    assert answer.error.code is ErrorCode.TOO_LARGE
    assert "more than 100000" in answer.error.message
    await well_behaved(server.path)


async def test_many_small_arrays_are_counted_as_they_decode(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_server(
        nursery, tmp_path / "c.sock", max_message_bytes=2 << 20, max_elements=10_000
    )
    raw = await Raw.open(server.path)
    # 10^6 elements in all, no array over 1000.
    await send_until_closed(raw, many_small_arrays(8, outer=1000, inner=1000))
    [answer] = await raw.until_closed()
    assert answer.msgid == 8 and answer.error is not None
    assert answer.error.code is ErrorCode.TOO_LARGE
    assert "10000" in answer.error.message and "max_elements" in answer.error.message
    # Under the limit, the same shape is an ordinary request.
    async with AsyncClient(server.path) as client:
        assert await client.call("echo", a=[[]] * 50) == {"a": [[]] * 50}


async def test_too_deep_is_bad_request_and_the_connection_goes_on(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_server(nursery, tmp_path / "c.sock", max_depth=8)
    deep: Any = "x"
    for _ in range(10):
        deep = [deep]
    raw = await Raw.open(server.path)
    await raw.send(encode_request(1, "echo", {"d": deep}) + encode_request(2, "ping"))
    bad, good = await raw.responses(2)
    assert bad.msgid == 1 and bad.error is not None
    assert bad.error.code is ErrorCode.BAD_REQUEST and "deeper than 8" in bad.error.message
    assert (good.msgid, good.result) == (2, "pong")


# -- slowloris -------------------------------------------------------------------------


async def test_a_message_trickled_in_is_closed_at_its_whole_frame_deadline(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # A byte every 0.1 s: each well within a per-read timeout, the whole message (over
    # 200 bytes, 20 s) far beyond its 1.5 s deadline.
    server = await start_server(nursery, tmp_path / "c.sock", partial_frame_timeout=1.5)
    raw = await Raw.open(server.path)
    data = encode_request(1, "echo", {"s": "y" * 200})
    sent = 0

    async def trickle() -> None:
        nonlocal sent
        for i in range(len(data)):
            try:
                await raw.send(data[i : i + 1])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            sent += 1
            await trio.sleep(0.1)

    async with trio.open_nursery() as inner:
        inner.start_soon(trickle)
        await trio.sleep(0.5)
        await well_behaved(server.path)  # answered while the trickle goes on
        assert await raw.until_closed(timeout=30) == []
        inner.cancel_scope.cancel()
    # Closed by the server with the message unfinished (never answered).
    assert sent < len(data), (sent, len(data))


# -- connection floods -----------------------------------------------------------------


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(os.fspath(path))
    return s


def closed_at_once(s: socket.socket) -> bool:
    """Whether the server closed ``s`` without a word (a ping gets no answer)."""
    try:
        s.sendall(encode_request(1, "ping"))
        return s.recv(1) == b""
    except (BrokenPipeError, ConnectionResetError):
        return True


async def test_connections_per_uid_are_capped(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await start_server(nursery, tmp_path / "c.sock", max_connections_per_uid=5)

    def flood() -> None:
        held = [connect(server.path) for _ in range(5)]
        try:
            for s in held:  # each one of the five is served
                s.sendall(encode_request(1, "ping"))
                rpc = RpcConnection()
                rpc.receive_data(s.recv(65536))
                assert next(rpc.events()).result == "pong"  # type: ignore[union-attr]
            extra = connect(server.path)
            assert closed_at_once(extra)
            extra.close()
        finally:
            for s in held:
                s.close()

    await in_thread(flood)

    # Once they are gone (the server notices each close), that uid may connect again.
    def ping() -> bool:
        try:
            return bool(Client(server.path, timeout=5).call("ping") == "pong")
        except ConnectionLost:
            return False

    with trio.fail_after(10):
        while not await in_thread(ping):
            await trio.sleep(0.05)


async def test_idle_connections_are_closed_but_not_busy_or_subscribed_ones(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_server(nursery, tmp_path / "c.sock", idle_timeout=0.5)
    idle = await Raw.open(server.path)
    busy = await Raw.open(server.path)
    await busy.send(encode_request(1, "sleep", {"seconds": 1.5, "tag": "done"}))
    assert await idle.until_closed(timeout=10) == []
    [answer] = await busy.responses(1)  # still open after 3 idle timeouts
    assert answer.result == "done"


# -- the budget shared by all connections -----------------------------------------------


async def test_the_decode_budget_refuses_what_all_connections_together_would_hold(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # 300 KB for everyone; each connection holds 60 KB of a message that never ends.
    server = await start_server(
        nursery,
        tmp_path / "c.sock",
        max_message_bytes=1 << 20,
        decode_budget=300_000,
        max_elements=100_000,
    )
    part = request_head(1, "echo") + b"\x81\xa1s\xdb" + struct.pack(">I", 500_000) + b"z" * 60_000
    holders = [await Raw.open(server.path) for _ in range(12)]
    for h in holders:
        await h.send(part)
    closed = 0
    for h in holders:
        with trio.move_on_after(0.5):
            await h.until_closed(timeout=10)
            closed += 1
    # (300 000 / (60 000 - 16 384 free)) = 6 fit; the others were cut off.
    assert 4 <= closed <= 8, closed
    # A small request rides on its connection's free allowance: it is always answered.
    await well_behaved(server.path)
    # A small message that decodes into much more than the rest of the budget (15 000
    # empty arrays: 15 KB of msgpack, ~1 MB of lists) is not run: overloaded; its
    # connection goes on.
    raw = await Raw.open(server.path)
    await raw.send(many_small_arrays(3, outer=15, inner=1000) + encode_request(4, "ping"))
    refused, pong = await raw.responses(2)
    assert refused.msgid == 3 and refused.error is not None
    assert refused.error.code is ErrorCode.OVERLOADED and "retry" in refused.error.message
    assert (pong.msgid, pong.result) == (4, "pong")


# -- against the real daemon -----------------------------------------------------------


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_the_issues_amplification_attack_leaves_the_daemon_small(cfg: ConfigDir) -> None:
    from tests.test_cli import DaemonProc

    cfg.tenant("amp", "[[worker]]\nname = 'w'\ncommand = ['sleep', '600']\n")
    cfg.write()
    d = DaemonProc(cfg)
    try:
        before = vm_hwm_kib(d.proc.pid)
        # 40 connections, each sending three attack messages (the issue: 5.8 GB).
        socks = [connect(cfg.socket) for _ in range(40)]
        for s in socks:
            try:
                for i in range(3):
                    s.sendall(
                        million_empty_arrays(i) if i != 1 else many_small_arrays(i, 900, 1000)
                    )
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed after the first: that is the point
        with Client(cfg.socket, timeout=10) as c:
            assert c.call("ping") == "pong"
        for s in socks:
            s.close()
        grown_mib = (vm_hwm_kib(d.proc.pid) - before) / 1024
        assert grown_mib < 100, grown_mib
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=30)


FLOOD = """
import socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
held, shut = [], 0
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(5)
    try:
        s.sendall(bytes([0x94, 0, 1, 0xa4]) + b"ping" + bytes([0x90]))
        answered = s.recv(64) != b""
    except OSError:  # closed with our ping unread: reset
        answered = False
    shut += not answered
    held.append(s)
# Half a message on every connection still open, then hold on (slowloris).
for s in held:
    try:
        s.sendall(bytes([0x94, 0, 2]))
    except OSError:
        pass
print(shut, flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_a_flooding_user_is_capped_and_cut_off_while_root_is_answered(cfg: ConfigDir) -> None:
    """The daemon's [control] settings, end to end: uid 65534 (a viewer) opens 12
    connections and leaves half a message on each; only 4 are let in, and those are
    closed at the 1 s frame deadline; root is answered all along."""
    import subprocess
    import sys
    import time

    from tests.test_cli import DaemonProc

    cfg.tenant("flood", "[[worker]]\nname = 'w'\ncommand = ['sleep', '600']\n")
    cfg.daemon_extra = (
        "\n[[control.grant]]\nrole = 'viewer'\nuids = [65534]\n\n"
        "[control]\nmax_connections_per_uid = 4\nframe_timeout = 1.0\n"
    )
    cfg.write(socket_mode=0o666)
    d = DaemonProc(cfg)
    try:
        flood = subprocess.Popen(
            ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
             sys.executable, "-c", FLOOD, str(cfg.socket), "12", "20"],
            stdout=subprocess.PIPE, text=True, cwd="/",
        )  # fmt: skip
        try:
            assert flood.stdout is not None
            assert flood.stdout.readline().strip() == "8"  # 12 - 4 shut at once
            began = time.monotonic()
            with Client(cfg.socket, timeout=10) as c:
                assert c.call("ping") == "pong"
            # The 4 held ones are gone well before the flood's 20 s hold ends.
            fds = lambda: sum(  # noqa: E731 - a one-off probe
                1 for f in os.listdir(f"/proc/{flood.pid}/fd")
                if os.readlink(f"/proc/{flood.pid}/fd/{f}").startswith("socket:")
            )  # fmt: skip
            assert fds() == 12
            out = d.output
            deadline = time.monotonic() + 15
            while "a message did not arrive whole in time" not in out() and (
                time.monotonic() < deadline
            ):
                time.sleep(0.1)
            assert out().count("a message did not arrive whole in time") == 4, out()
            assert "too many control connections from one user" in out()
            assert time.monotonic() - began < 15
            with Client(cfg.socket, timeout=10) as c:
                assert c.call("ping") == "pong"
        finally:
            flood.kill()
            flood.wait(timeout=30)
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=30)


# -- the decoder with limits, on any input -----------------------------------------------

nested = st.recursive(
    st.none() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=30,
)


def elements(value: Any) -> int:
    """Arrays, maps and their elements, counted as the decoder's limit counts them."""
    if isinstance(value, list):
        return len(value) + 1 + sum(elements(v) for v in value)
    if isinstance(value, dict):
        return 2 * len(value) + 1 + sum(elements(v) for v in value.values())
    return 0


@settings(max_examples=150, deadline=None)
@given(
    chunks=st.lists(
        st.binary(max_size=64)
        | st.builds(msgpack.packb, nested)
        | st.builds(lambda m, p: msgpack.packb([0, m, "x", [{"p": p}]]), st.integers(0, 9), nested),
        max_size=8,
    )
)
def test_limited_decoding_raises_only_protocol_errors_and_keeps_its_bounds(
    chunks: list[bytes],
) -> None:
    conn = RpcConnection(4096, max_elements=12, max_depth=4)
    for chunk in chunks:
        conn.receive_data(chunk)
        try:
            for event in conn.events():
                if isinstance(event, InvalidMessage):
                    continue
                params = getattr(event, "params", None)
                assert elements(params) <= 12
                assert not _deeper_than(params, 4)
        except ProtocolError as exc:
            assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)
            break


@pytest.mark.parametrize("decoder", ["c", "pure-python"])
def test_elements_are_counted_once_when_a_message_comes_a_byte_at_a_time(
    decoder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # QNX runs msgpack's pure-Python decoder, which parses an incomplete message again
    # from its start each time more bytes come; the C one resumes. Either way a message
    # of exactly max_elements decodes, and one more element is too many.
    if decoder == "pure-python":
        import msgpack.fallback

        monkeypatch.setattr(msgpack, "Unpacker", msgpack.fallback.Unpacker)
    params = {"a": [[1], [2], [3]]}
    data = encode_request(1, "echo", params)
    exact = elements([0, 1, "echo", [params]])
    for limit, ok in ((exact, True), (exact - 1, False)):
        conn = RpcConnection(4096, max_elements=limit)
        got: list[Any] = []
        try:
            for i in range(len(data)):
                conn.receive_data(data[i : i + 1])
                got.extend(conn.events())
        except ProtocolError as exc:
            assert not ok and exc.code is ErrorCode.TOO_LARGE
            continue
        assert ok and [e.params for e in got] == [params]
