"""The control server over real Unix sockets, with a toy method table.

Marked ``integration`` although no daemon runs: these are the socket edge cases
(partial frames, peers gone mid-request, oversize frames, garbage), which depend on
trio's I/O back end, so CI runs them again with the poll(2) one (``.ci/run``).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisord_qnx.control.client import (
    AsyncClient,
    CallTimeout,
    Client,
    ConnectionLost,
    ControlSocketMissing,
    DaemonNotRunning,
)
from supervisord_qnx.control.rpc import (
    ConnectionClosed,
    ErrorCode,
    Response,
    RpcConnection,
    RpcError,
    encode_request,
)
from supervisord_qnx.control.server import (
    AlreadyRunning,
    Connection,
    MethodTable,
    ServeError,
    serve,
)

pytestmark = pytest.mark.integration

LIMIT = 64 * 1024


@dataclass
class Toy:
    """The state behind the toy methods, for assertions."""

    running: int = 0
    max_running: int = 0


def toy_methods(toy: Toy) -> MethodTable:
    methods = MethodTable()

    @methods.method("ping")
    async def ping(params: dict[str, Any], conn: Connection) -> str:
        return "pong"

    @methods.method("echo")
    async def echo(params: dict[str, Any], conn: Connection) -> Any:
        return params

    @methods.method("sleep")
    async def sleep(params: dict[str, Any], conn: Connection) -> Any:
        toy.running += 1
        toy.max_running = max(toy.max_running, toy.running)
        try:
            await trio.sleep(params.get("seconds", 0.05))
        finally:
            toy.running -= 1
        return params.get("tag")

    @methods.method("fail")
    async def fail(params: dict[str, Any], conn: Connection) -> None:
        raise ValueError("deliberate failure")

    @methods.method("missing")
    async def missing(params: dict[str, Any], conn: Connection) -> None:
        # An RpcError raised inside a nursery arrives wrapped in a group.
        async with trio.open_nursery():
            raise RpcError(ErrorCode.NOT_FOUND, "no tenant 'x'")

    @methods.method("big")
    async def big(params: dict[str, Any], conn: Connection) -> str:
        return "x" * params["size"]

    @methods.method("notify")
    async def notify(params: dict[str, Any], conn: Connection) -> str:
        for n in range(params["count"]):
            assert await conn.send_notification("tick", {"n": n})
        return "sent"

    @methods.method("whoami")
    async def whoami(params: dict[str, Any], conn: Connection) -> Any:
        assert conn.peer is not None
        return {"pid": conn.peer.pid, "uid": conn.peer.uid, "gid": conn.peer.gid}

    return methods


@dataclass
class Server:
    path: Path
    toy: Toy


async def start_server(nursery: trio.Nursery, path: Path, **options: Any) -> Server:
    toy = Toy()
    options.setdefault("max_message_bytes", LIMIT)
    options.setdefault("partial_frame_timeout", 5.0)
    await nursery.start(partial(serve, path, toy_methods(toy), **options))
    return Server(path, toy)


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> Server:
    # "run/" does not exist yet: serve() creates it.
    return await start_server(nursery, tmp_path / "run" / "control.sock")


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run blocking client code off the trio thread (the server lives on it)."""
    return trio.to_thread.run_sync(fn)


class Raw:
    """A hand-driven connection for sending exact bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.rpc = RpcConnection(1 << 22)

    @classmethod
    async def open(cls, path: Path) -> Raw:
        return cls(await trio.open_unix_socket(os.fspath(path)))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def responses(self, n: int) -> list[Response]:
        got: list[Response] = []
        with trio.fail_after(5):
            while len(got) < n:
                for event in self.rpc.events():
                    assert isinstance(event, Response), event
                    got.append(event)
                if len(got) < n:
                    self.rpc.receive_data(await self.stream.receive_some(65536))
        return got

    async def until_closed(self, timeout: float = 5) -> list[Any]:
        """Everything the server sends until it closes the connection."""
        events: list[Any] = []
        with trio.fail_after(timeout):
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                self.rpc.receive_data(data)
                events.extend(e for e in self.rpc.events() if isinstance(e, Response))
                if not data:
                    return events


# -- basics ------------------------------------------------------------------


async def test_ping_with_both_clients(server: Server) -> None:
    assert await in_thread(lambda: Client(server.path).call("ping")) == "pong"
    async with AsyncClient(server.path) as client:
        assert await client.call("ping") == "pong"
        assert await client.call("echo", a=1, b=[1, "x"]) == {"a": 1, "b": [1, "x"]}


async def test_socket_is_private_and_umask_restored(server: Server) -> None:
    mode = os.stat(server.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    umask = os.umask(0o022)
    os.umask(umask)
    assert umask != 0o177


async def test_socket_mode_option(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await start_server(nursery, tmp_path / "c.sock", mode=0o660)
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o660


async def test_peer_credentials(server: Server) -> None:
    peer = await in_thread(lambda: Client(server.path).call("whoami"))
    assert peer == {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}


async def test_unknown_method(server: Server) -> None:
    with pytest.raises(RpcError) as info:
        await in_thread(lambda: Client(server.path).call("nope"))
    assert info.value.code is ErrorCode.UNKNOWN_METHOD
    assert "'nope'" in info.value.message and "ping" in info.value.message


async def test_handler_exception_is_internal_and_server_goes_on(server: Server) -> None:
    async with AsyncClient(server.path) as client:
        with pytest.raises(RpcError) as info:
            await client.call("fail")
        assert info.value.code is ErrorCode.INTERNAL
        assert info.value.message == "deliberate failure"
        assert info.value.data == {"exception": "ValueError"}
        assert await client.call("ping") == "pong"


async def test_rpc_error_wrapped_by_a_nursery_keeps_its_code(server: Server) -> None:
    async with AsyncClient(server.path) as client:
        with pytest.raises(RpcError) as info:
            await client.call("missing")
        assert info.value.code is ErrorCode.NOT_FOUND


async def test_params_of_the_wrong_shape_are_bad_request(server: Server) -> None:
    raw = await Raw.open(server.path)
    packed = msgpack.packb([0, 7, "echo", {"a": 1}]) + msgpack.packb([0, 8, 5, []])
    await raw.send(packed + encode_request(9, "ping"))
    bad1, bad2, good = await raw.responses(3)
    assert (bad1.msgid, bad1.error and bad1.error.code) == (7, ErrorCode.BAD_REQUEST)
    assert (bad2.msgid, bad2.error and bad2.error.code) == (8, ErrorCode.BAD_REQUEST)
    assert (good.msgid, good.result) == (9, "pong")


async def test_notifications_and_responses_from_a_client_are_ignored(server: Server) -> None:
    raw = await Raw.open(server.path)
    stray = msgpack.packb([2, "hello", []]) + msgpack.packb([1, 5, None, "x"])
    await raw.send(stray + encode_request(1, "ping"))
    [response] = await raw.responses(1)
    assert (response.msgid, response.result) == (1, "pong")


async def test_bad_limits_are_refused_before_binding(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        await serve(tmp_path / "c.sock", MethodTable(), max_message_bytes=10)
    with pytest.raises(ValueError):
        await serve(tmp_path / "c.sock", MethodTable(), max_in_flight=0)
    assert not (tmp_path / "c.sock").exists()


# -- concurrency -----------------------------------------------------------


async def test_slow_request_does_not_block_a_fast_one(server: Server) -> None:
    raw = await Raw.open(server.path)
    await raw.send(
        encode_request(1, "sleep", {"seconds": 0.3, "tag": "slow"})
        + encode_request(2, "echo", {"tag": "fast"})
    )
    first, second = await raw.responses(2)
    assert (first.msgid, first.result) == (2, {"tag": "fast"})
    assert (second.msgid, second.result) == (1, "slow")


async def test_async_client_matches_concurrent_calls(server: Server) -> None:
    results: dict[int, Any] = {}
    async with AsyncClient(server.path) as client:

        async def one(i: int) -> None:
            results[i] = await client.call("sleep", seconds=(10 - i) / 100, tag=i)

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, i)
    assert results == {i: i for i in range(10)}


async def test_in_flight_requests_are_bounded(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await start_server(nursery, tmp_path / "c.sock", max_in_flight=2)
    raw = await Raw.open(server.path)
    await raw.send(b"".join(encode_request(i, "sleep", {"tag": i}) for i in range(6)))
    responses = await raw.responses(6)
    assert sorted(r.result for r in responses) == list(range(6))
    assert server.toy.max_running == 2


async def test_notifications_reach_the_async_client(server: Server) -> None:
    async with AsyncClient(server.path) as client:
        assert await client.call("notify", count=3) == "sent"
        with trio.fail_after(5):
            got = [await client.notifications.receive() for _ in range(3)]
    assert [(n.method, n.params) for n in got] == [("tick", {"n": n}) for n in range(3)]


async def test_client_gone_mid_request_does_not_disturb_the_server(server: Server) -> None:
    for _ in range(5):
        raw = await Raw.open(server.path)
        await raw.send(encode_request(1, "sleep", {"seconds": 0.1}))
        await raw.stream.aclose()
    await trio.sleep(0.3)  # the responses are written to closed sockets by now
    assert await in_thread(lambda: Client(server.path).call("ping")) == "pong"


# -- misuse ----------------------------------------------------------------

garbage = st.lists(
    st.binary(max_size=200)
    | st.builds(
        msgpack.packb,
        st.recursive(
            st.none()
            | st.integers(-(2**63), 2**64 - 1)
            | st.text(max_size=10)
            | st.binary(max_size=10),
            lambda inner: st.lists(inner, max_size=5),
            max_leaves=10,
        ),
    )
    | st.builds(lambda m: encode_request(m, "echo", {"k": "v"})[: m % 12], st.integers(0, 99))
    | st.sampled_from([b"\x94\x00", b"\xdb\xff\xff\xff\xff", b"\xc1", b"\x94\x03\x01"]),
    min_size=1,
    max_size=6,
).map(b"".join)


async def test_garbage_on_one_connection_does_not_disturb_another(server: Server) -> None:
    good = Client(server.path, timeout=5)

    @settings(
        max_examples=100,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(data=garbage, n=st.integers(0, 1000))
    def check(data: bytes, n: int) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
            bad.settimeout(5)
            bad.connect(os.fspath(server.path))
            received = b""
            try:
                bad.sendall(data)
                bad.shutdown(socket.SHUT_WR)  # EOF: the server must finish and close
                while chunk := bad.recv(65536):
                    received += chunk
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed on us: a legitimate answer to garbage
        # Whatever came back is whole, well-formed responses and then a clean close:
        # parsed to the end of the stream, a stray byte is a ProtocolError and a cut
        # frame a partial close, both failures here.
        rpc = RpcConnection()
        rpc.receive_data(received)
        rpc.receive_data(b"")
        *responses, closed = list(rpc.events())
        # Garbage can happen to spell a valid request: any response is fine.
        assert all(isinstance(r, Response) for r in responses), responses
        assert closed == ConnectionClosed(partial=False), received
        assert good.call("echo", n=n) == {"n": n}

    await in_thread(check)
    good.close()


async def test_oversized_request_gets_too_large_then_close(server: Server) -> None:
    raw = await Raw.open(server.path)
    await raw.send(encode_request(42, "echo", {"s": "x" * (LIMIT + 10)}))
    [response] = await raw.until_closed()
    assert response.msgid == 42
    assert response.error is not None and response.error.code is ErrorCode.TOO_LARGE


async def test_oversized_garbage_is_closed_without_answer(server: Server) -> None:
    raw = await Raw.open(server.path)
    await raw.send(b"\xdb\x00\x10\x00\x00" + b"x" * (LIMIT + 10))
    assert await raw.until_closed() == []


async def test_oversized_result_is_too_large_and_connection_survives(server: Server) -> None:
    with Client(server.path) as client:
        with pytest.raises(RpcError) as info:
            await in_thread(lambda: client.call("big", size=LIMIT))
        assert info.value.code is ErrorCode.TOO_LARGE
        assert "ask for less" in info.value.message
        assert await in_thread(lambda: client.call("big", size=10)) == "x" * 10


async def test_reply_larger_than_the_socket_buffer_arrives_whole(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The server writes what the socket takes at once, then waits for the client to
    # read the rest: a client that starts reading late still gets every byte, in order.
    size = 4 << 20
    server = await start_server(nursery, tmp_path / "c.sock", max_message_bytes=2 * size)
    late = await Raw.open(server.path)
    late.rpc = RpcConnection(2 * size)
    await late.send(encode_request(7, "big", {"size": size}))
    await trio.sleep(0.3)  # the reply now fills the socket buffer and waits
    with Client(server.path) as other:  # the server still answers others meanwhile
        assert await in_thread(lambda: other.call("ping")) == "pong"
    [response] = await late.responses(1)
    assert response.msgid == 7 and response.result == "x" * size


async def test_client_that_stops_reading_is_disconnected_others_served(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # partial_frame_timeout also bounds how long one reply may wait for its reader.
    server = await start_server(
        nursery, tmp_path / "c.sock", max_message_bytes=4 << 20, partial_frame_timeout=0.3
    )
    stuck = await Raw.open(server.path)
    for msgid in range(8):
        await stuck.send(encode_request(msgid, "big", {"size": 1 << 20}))
    await trio.sleep(1.5)  # never reading: far more than the socket buffers hold
    with Client(server.path) as other:
        assert await in_thread(lambda: other.call("ping")) == "pong"
    got = 0
    with trio.fail_after(5):
        while data := await stuck.stream.receive_some(1 << 20):
            got += len(data)
    # The connection was closed (EOF) before the 8 MiB asked for were sent.
    assert 0 < got < 8 << 20


async def test_partial_frame_times_out_but_idle_connection_stays(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_server(nursery, tmp_path / "c.sock", partial_frame_timeout=0.2)
    idle = await Raw.open(server.path)
    stuck = await Raw.open(server.path)
    await stuck.send(encode_request(1, "ping")[:4])
    assert await stuck.until_closed(timeout=3) == []
    await idle.send(encode_request(2, "ping"))
    [response] = await idle.responses(1)
    assert response.result == "pong"


# -- the socket file ------------------------------------------------------


async def test_live_socket_raises_already_running(server: Server) -> None:
    with pytest.raises(AlreadyRunning, match="already serving on"):
        await serve(server.path, MethodTable())
    assert await in_thread(lambda: Client(server.path).call("ping")) == "pong"


async def test_stale_socket_is_replaced(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(os.fspath(path))  # bound, never listening, then closed: the file stays
    assert path.exists()
    with pytest.raises(DaemonNotRunning, match="no daemon is listening"):
        await in_thread(lambda: Client(path).call("ping"))
    await start_server(nursery, path)
    assert await in_thread(lambda: Client(path).call("ping")) == "pong"


async def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    path.write_text("precious")
    with pytest.raises(ServeError, match="not a socket"):
        await serve(path, MethodTable())
    assert path.read_text() == "precious"


async def test_socket_removed_on_shutdown(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    async with trio.open_nursery() as nursery:
        await start_server(nursery, path)
        assert path.exists()
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_socket_replaced_by_someone_else_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    async with trio.open_nursery() as nursery:
        await start_server(nursery, path)
        path.unlink()
        path.write_text("someone else's")
        nursery.cancel_scope.cancel()
    assert path.read_text() == "someone else's"


# -- clients -----------------------------------------------------------------


async def test_missing_socket_tells_how_to_start_the_daemon(tmp_path: Path) -> None:
    with pytest.raises(ControlSocketMissing) as info:
        Client(tmp_path / "none.sock").call("ping")
    assert isinstance(info.value, FileNotFoundError)
    assert "is supervisord-qnx running?" in str(info.value) and "make run" in str(info.value)
    with pytest.raises(ControlSocketMissing):
        async with AsyncClient(tmp_path / "none.sock"):
            pass


async def test_sync_client_timeout_then_reconnects(server: Server) -> None:
    client = Client(server.path, timeout=0.2)
    with pytest.raises(CallTimeout, match=r"within 0\.2 s"):
        await in_thread(lambda: client.call("sleep", seconds=1))
    assert await in_thread(lambda: client.call("ping")) == "pong"
    client.close()


async def test_async_client_sees_the_daemon_go_away(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    async with trio.open_nursery() as server_nursery:
        await start_server(server_nursery, path)
        async with AsyncClient(path) as client:

            async def stop_soon() -> None:
                await trio.sleep(0.1)
                server_nursery.cancel_scope.cancel()

            server_nursery.start_soon(stop_soon)
            with pytest.raises(ConnectionLost, match="closed the connection"):
                await client.call("sleep", seconds=5)


def test_client_module_does_not_import_trio() -> None:
    code = (
        "import sys, supervisord_qnx.control.client\n"
        "assert 'trio' not in sys.modules, 'trio imported'\n"
        "assert 'structlog' not in sys.modules, 'structlog imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
