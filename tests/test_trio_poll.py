"""Tests for the poll(2) I/O back end (supervisord_qnx._trio_poll).

Two styles:

* in-process: plain (sync) tests that swap ``TheIOManager`` with pytest's
  monkeypatch and call ``trio.run`` themselves, so pytest-trio's own loop is
  not involved and the swap is undone afterwards;
* subprocess: fresh interpreters that go through ``select_io_backend()``
  exactly like the daemon does, including a simulated QNX (no epoll, no
  kqueue, no pidfd, ``sys.platform`` not Linux) where ``import trio`` alone
  fails.

Timing assertions are deliberately loose: CI shares two cores with other jobs.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
import trio._core._run as trio_run_module
import trio.testing

from supervisord_qnx import _trio_poll
from supervisord_qnx._trio_poll import ENV_VAR, PollIOManager

# -- helpers ---------------------------------------------------------------------


def backend() -> str:
    return str(trio.lowlevel.current_statistics().io_statistics.backend)


def io_stats() -> Any:
    return trio.lowlevel.current_statistics().io_statistics


RunPoll = Callable[..., Any]


@pytest.fixture
def run_poll(monkeypatch: pytest.MonkeyPatch) -> RunPoll:
    """``trio.run`` with the poll manager, restored afterwards."""
    monkeypatch.setattr(trio_run_module, "TheIOManager", PollIOManager)

    def run(async_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        async def checked() -> Any:
            assert backend() == "poll"
            return await async_fn(*args)

        return trio.run(checked)

    return run


def run_python(*parts: str, env_var: str | None, timeout: float = 60) -> str:
    """Run the code *parts* in a fresh interpreter; return stdout, fail on non-zero exit."""
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    if env_var is not None:
        env[ENV_VAR] = env_var
    proc = subprocess.run(
        [sys.executable, "-c", "\n".join(textwrap.dedent(part) for part in parts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def short_tmp() -> Iterator[str]:
    # AF_UNIX paths are limited to ~100 bytes; pytest's tmp_path can exceed it.
    with tempfile.TemporaryDirectory(prefix="sqp-", dir="/tmp") as d:
        yield d


# A program exercising sockets, Unix sockets, pipes and child processes;
# shared by the subprocess tests.  Prints one line per check.
ROUND_TRIPS = """
    import os, sys, tempfile
    import trio

    async def main():
        print("backend", trio.lowlevel.current_statistics().io_statistics.backend)
        a, b = trio.socket.socketpair()
        with a, b:
            await a.send(b"ping")
            print("socketpair", (await b.recv(10)).decode())

        d = tempfile.mkdtemp(prefix="sqp-", dir="/tmp")
        path = os.path.join(d, "s")
        listen_sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listen_sock.bind(path)
        listen_sock.listen()
        listener = trio.SocketListener(listen_sock)

        async def echo(stream):
            async with stream:
                data = await stream.receive_some(100)
                await stream.send_all(data.upper())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, echo, [listener])
            stream = await trio.open_unix_socket(path)
            async with stream:
                await stream.send_all(b"unix")
                print("unix", (await stream.receive_some(100)).decode())
            nursery.cancel_scope.cancel()
        os.unlink(path)
        os.rmdir(d)

        result = await trio.run_process(
            [sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read()[::-1])"],
            stdin=b"olleh",
            capture_stdout=True,
        )
        print("process", result.stdout.decode())

    trio.run(main)
"""

# Make this interpreter look like QNX Neutrino to trio: no epoll, no kqueue,
# no pidfd, and a non-Linux sys.platform (trio keys several import-time
# decisions off sys.platform, so deleting select.epoll alone is not enough).
QNX_PRELUDE = """
    import os, select, sys
    del select.epoll
    if hasattr(select, "kqueue"):
        del select.kqueue
    if hasattr(os, "pidfd_open"):
        del os.pidfd_open
    sys.platform = "qnx8"
"""


# -- in-process: basic I/O -------------------------------------------------------


def test_backend_reports_poll(run_poll: RunPoll) -> None:
    async def main() -> Any:
        return io_stats()

    stats = run_poll(main)
    assert stats.backend == "poll"
    assert stats.tasks_waiting_write == 0


def test_socketpair_bulk_transfer_both_directions(run_poll: RunPoll) -> None:
    # Bigger than any socket buffer, so both wait_writable and wait_readable block.
    payload = os.urandom(4 * 1024 * 1024)

    async def pump(sock: trio.socket.SocketType, received: bytearray) -> None:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                view = memoryview(payload)
                while view:
                    view = view[await sock.send(view[: 256 * 1024]) :]
                sock.shutdown(socket.SHUT_WR)

            nursery.start_soon(send)
            while chunk := await sock.recv(65536):
                received.extend(chunk)

    async def main() -> tuple[bytearray, bytearray]:
        a, b = trio.socket.socketpair()
        got_a, got_b = bytearray(), bytearray()
        with a, b:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, a, got_a)
                nursery.start_soon(pump, b, got_b)
        return got_a, got_b

    got_a, got_b = run_poll(main)
    assert got_a == payload
    assert got_b == payload


def test_many_concurrent_waiters(run_poll: RunPoll) -> None:
    n = 200

    async def main() -> None:
        pairs = [trio.socket.socketpair() for _ in range(n)]
        seen: list[int] = []

        async def reader(i: int, sock: trio.socket.SocketType) -> None:
            assert await sock.recv(10) == str(i).encode()
            seen.append(i)

        async with trio.open_nursery() as nursery:
            for i, (_, b) in enumerate(pairs):
                nursery.start_soon(reader, i, b)
            await trio.testing.wait_all_tasks_blocked()
            stats = io_stats()
            assert stats.tasks_waiting_read >= n
            assert stats.registered_fds >= n
            # Wake them in a scrambled order.
            for i in sorted(range(n), key=lambda i: (i * 7919) % n):
                await pairs[i][0].send(str(i).encode())
        assert sorted(seen) == list(range(n))
        # Every woken reader left the interest set (level-triggered poll must not spin).
        assert io_stats().registered_fds <= 1  # at most trio's own wakeup socket
        for a, b in pairs:
            a.close()
            b.close()

    run_poll(main)


def test_unix_socket_serve_round_trip(run_poll: RunPoll, short_tmp: str) -> None:
    path = os.path.join(short_tmp, "sock")

    async def main() -> list[bytes]:
        listen_sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listen_sock.bind(path)
        listen_sock.listen()
        replies: list[bytes] = []

        async def handler(stream: trio.SocketStream) -> None:
            async with stream:
                while data := await stream.receive_some(1024):
                    await stream.send_all(b"echo:" + data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handler, [trio.SocketListener(listen_sock)])

            async def client(i: int) -> None:
                async with await trio.open_unix_socket(path) as stream:
                    await stream.send_all(b"%d" % i)
                    replies.append(await stream.receive_some(1024))

            async with trio.open_nursery() as clients:
                for i in range(20):
                    clients.start_soon(client, i)
            nursery.cancel_scope.cancel()
        return replies

    assert sorted(run_poll(main)) == sorted(b"echo:%d" % i for i in range(20))


def test_subprocess_pipes(run_poll: RunPoll) -> None:
    async def main() -> subprocess.CompletedProcess[bytes]:
        return await trio.run_process(
            [
                sys.executable,
                "-c",
                "import sys; data = sys.stdin.read(); print(data.upper()); "
                "print('err', file=sys.stderr); sys.exit(3)",
            ],
            stdin=b"x" * 200_000,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )

    result = run_poll(main)
    assert result.returncode == 3
    assert result.stdout == b"X" * 200_000 + b"\n"
    assert result.stderr == b"err\n"


# -- in-process: closing, errors, hang-ups ------------------------------------------


def test_notify_closing_wakes_readers_and_writers(run_poll: RunPoll) -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        # Fill the send buffer so a writer really waits.
        with pytest.raises(BlockingIOError):
            while True:
                a.send(b"x" * 65536)
        outcomes: list[str] = []

        async def wait(fn: Callable[[int], Awaitable[None]], name: str) -> None:
            with pytest.raises(trio.ClosedResourceError):
                await fn(a.fileno())
            outcomes.append(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, trio.lowlevel.wait_readable, "reader")
            nursery.start_soon(wait, trio.lowlevel.wait_writable, "writer")
            await trio.testing.wait_all_tasks_blocked()
            assert io_stats().tasks_waiting_write == 1
            trio.lowlevel.notify_closing(a)  # objects with fileno() are accepted too
            a.close()
        assert sorted(outcomes) == ["reader", "writer"]
        assert io_stats().tasks_waiting_write == 0
        # notify_closing on a descriptor nobody waits for is a no-op.
        trio.lowlevel.notify_closing(b.fileno())
        b.close()

    run_poll(main)


def test_second_waiter_is_busy(run_poll: RunPoll) -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        with a, b:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.lowlevel.wait_readable, b)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await trio.lowlevel.wait_readable(b)
                # A writer on the same fd is fine.
                await trio.lowlevel.wait_writable(b)
                a.send(b"!")
            assert io_stats().registered_fds <= 1

    run_poll(main)


def test_descriptor_closed_behind_our_back_raises_ebadf(run_poll: RunPoll) -> None:
    # POLLNVAL: epoll would have refused the registration with EBADF (or, if
    # closed later, left the waiter asleep forever); poll reports it per fd.
    async def main() -> None:
        a, b = socket.socketpair()
        with a:
            fd = b.detach()
            got: list[OSError] = []

            async def waiter() -> None:
                with pytest.raises(OSError) as exc_info:
                    await trio.lowlevel.wait_readable(fd)
                got.append(exc_info.value)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                os.close(fd)  # no notify_closing()
            assert got[0].errno == errno.EBADF
            # And waiting on an already-closed descriptor fails the same way.
            with pytest.raises(OSError) as exc_info:
                await trio.lowlevel.wait_writable(fd)
            assert exc_info.value.errno == errno.EBADF
            assert io_stats().registered_fds <= 1

    run_poll(main)


def test_invalid_descriptor_leaves_no_state(run_poll: RunPoll) -> None:
    async def main() -> None:
        with pytest.raises((ValueError, OverflowError)):
            await trio.lowlevel.wait_readable(-1)
        stats = io_stats()
        assert stats.registered_fds <= 1
        assert stats.tasks_waiting_write == 0

    run_poll(main)


def test_hangup_wakes_reader_and_writer(run_poll: RunPoll) -> None:
    async def main() -> None:
        raw_a, b = socket.socketpair()
        raw_a.setblocking(False)
        # Fill a's send buffer so that a writer on `a` blocks.
        with pytest.raises(BlockingIOError):
            while True:
                raw_a.send(b"x" * 65536)
        a = trio.socket.from_stdlib_socket(raw_a)
        with a:
            results: dict[str, object] = {}

            async def writer() -> None:
                try:
                    await a.send(b"more")
                except OSError as exc:
                    results["writer"] = exc.errno

            async def reader() -> None:
                try:
                    results["reader"] = await a.recv(10)
                except OSError as exc:  # b closed with unread data: RST, not EOF
                    results["reader"] = exc.errno

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                b.close()  # POLLHUP on a
        assert results["reader"] in (b"", errno.ECONNRESET)
        assert results["writer"] in (errno.EPIPE, errno.ECONNRESET)

    run_poll(main)


# -- in-process: time and cancellation ---------------------------------------------


def test_timeouts_are_roughly_accurate(run_poll: RunPoll) -> None:
    async def main() -> tuple[float, float]:
        start = trio.current_time()
        await trio.sleep(0.05)
        slept = trio.current_time() - start
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(0.1):
                await trio.sleep_forever()
        return slept, trio.current_time() - start

    slept, failed_after = run_poll(main)
    assert 0.05 <= slept < 2
    assert 0.1 <= failed_after < 2


class _CountIOWaits(trio.abc.Instrument):
    def __init__(self) -> None:
        self.waits = 0

    def before_io_wait(self, timeout: float) -> None:  # noqa: ARG002 - trio's hook signature
        self.waits += 1


def test_sub_millisecond_timeouts_round_up_instead_of_spinning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(trio_run_module, "TheIOManager", PollIOManager)
    counter = _CountIOWaits()

    async def main() -> None:
        for _ in range(20):
            await trio.sleep(0.0003)

    trio.run(main, instruments=[counter])
    # ~1-3 waits per sleep when rounding up; truncating 0.3 ms to 0 ms would
    # busy-poll until each deadline: hundreds to thousands of waits.
    assert counter.waits < 200


def test_get_events_rounds_up_to_whole_milliseconds() -> None:
    manager = PollIOManager()
    try:
        start = time.perf_counter()
        assert manager.get_events(0.0002) == []
        assert time.perf_counter() - start >= 0.0002
        assert manager.get_events(0) == []
    finally:
        manager.close()


def test_cancelled_wait_unregisters(run_poll: RunPoll) -> None:
    async def main() -> None:
        a, b = trio.socket.socketpair()
        with a, b:
            with trio.move_on_after(0.05) as scope:
                await trio.lowlevel.wait_readable(b)
            assert scope.cancelled_caught
            assert io_stats().registered_fds <= 1
            # The fd is free for another waiter, which still works.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.lowlevel.wait_readable, b)
                await trio.testing.wait_all_tasks_blocked()
                await a.send(b"x")

    run_poll(main)


# -- in-process: wakeups from other threads --------------------------------------


def test_wakeup_from_another_thread(run_poll: RunPoll) -> None:
    async def main() -> float:
        event = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def from_thread() -> None:
            time.sleep(0.1)
            trio.from_thread.run_sync(event.set, trio_token=token)

        # A plain thread (not trio.to_thread), and no deadline in the loop:
        # only a cross-thread wakeup can end this wait.
        thread = threading.Thread(target=from_thread)
        start = time.perf_counter()
        thread.start()
        await event.wait()
        elapsed = time.perf_counter() - start
        thread.join()
        return elapsed

    assert run_poll(main) < 10


def test_force_wakeup_interrupts_get_events() -> None:
    manager = PollIOManager()
    try:
        timer = threading.Timer(0.1, manager.force_wakeup)
        start = time.perf_counter()
        timer.start()
        events = manager.get_events(30)
        assert time.perf_counter() - start < 10
        assert events
        manager.force_wakeup()
        manager.force_wakeup()
        manager.process_events(manager.get_events(1))
        # Drained: nothing pending any more.
        assert manager.get_events(0) == []
        timer.join()
    finally:
        manager.close()


def test_guest_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    # Guest mode calls get_events() from a worker thread and force_wakeup()
    # when the host reschedules: the manager's cross-thread paths.
    import queue

    monkeypatch.setattr(trio_run_module, "TheIOManager", PollIOManager)
    todo: queue.Queue[Callable[[], object]] = queue.Queue()
    done: list[Any] = []

    async def guest() -> str:
        assert backend() == "poll"
        a, b = trio.socket.socketpair()
        with a, b:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.send, b"guest")
                data = await b.recv(10)
            await trio.sleep(0.01)
            return data.decode()

    trio.lowlevel.start_guest_run(
        guest,
        run_sync_soon_threadsafe=todo.put,
        done_callback=done.append,
    )
    deadline = time.monotonic() + 30
    while not done:
        todo.get(timeout=max(0.0, deadline - time.monotonic()))()
    assert done[0].unwrap() == "guest"


# -- policy, pinning, failure modes ------------------------------------------------


def test_unverified_trio_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_trio_poll, "_installed", False)
    monkeypatch.setattr(_trio_poll, "_trio_version", lambda: "0.26.2")
    manager_before = trio_run_module.TheIOManager  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError) as exc_info:
        _trio_poll.install()
    message = str(exc_info.value)
    assert "0.26.2" in message
    assert "0.35.0" in message
    assert trio_run_module.TheIOManager is manager_before  # type: ignore[attr-defined]


def test_missing_internal_is_refused() -> None:
    import types

    fake_run = types.ModuleType("fake_run")
    with pytest.raises(RuntimeError, match=r"TheIOManager is missing.*|trio\._core\._run"):
        _trio_poll._check_internals("0.35.0", trio, fake_run)


def test_dispatch_check_accepts_installed_trio() -> None:
    _trio_poll._check_internals(trio.__version__, trio, trio_run_module)


def test_installed_trio_is_verified() -> None:
    assert trio.__version__ in _trio_poll.VERIFIED_TRIO_VERSIONS


def test_bad_env_value_is_refused() -> None:
    with pytest.raises(RuntimeError, match="SUPERVISORD_QNX_IO"):
        _trio_poll.select_backend("epol")


def test_native_refused_where_trio_has_no_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_trio_poll, "_installed", False)
    monkeypatch.setattr(_trio_poll, "native_backend_available", lambda: False)
    with pytest.raises(RuntimeError, match="neither epoll nor kqueue"):
        _trio_poll.select_backend("native")


def test_kqueue_entry_points_fail_clearly(run_poll: RunPoll) -> None:
    async def main() -> None:
        manager: Any = trio_run_module.GLOBAL_RUN_CONTEXT.runner.io_manager
        with pytest.raises(RuntimeError, match="poll"):
            manager.current_kqueue()

    run_poll(main)


# -- subprocess: the real install paths ---------------------------------------------


def test_forced_poll_in_fresh_interpreter() -> None:
    out = run_python(
        """
        from supervisord_qnx.iomanager import select_io_backend
        assert select_io_backend() == "poll"
        """,
        ROUND_TRIPS,
        env_var="poll",
    )
    assert out.split("\n")[:4] == [
        "backend poll",
        "socketpair ping",
        "unix UNIX",
        "process hello",
    ]


@pytest.mark.skipif(sys.platform != "linux", reason="checks the Linux default")
def test_default_on_linux_stays_epoll() -> None:
    out = run_python(
        """
        from supervisord_qnx.iomanager import select_io_backend
        print("selected", select_io_backend())
        import trio
        async def main():
            print("backend", trio.lowlevel.current_statistics().io_statistics.backend)
        trio.run(main)
        """,
        env_var=None,
    )
    assert out.split() == ["selected", "native", "backend", "epoll"]


def test_install_after_trio_imported_before_run() -> None:
    # What the test-suite conftest does: pytest-trio imported trio first.
    out = run_python(
        """
        import trio
        from supervisord_qnx.iomanager import select_io_backend
        assert select_io_backend() == "poll"
        async def main():
            print(trio.lowlevel.current_statistics().io_statistics.backend)
        trio.run(main)
        """,
        env_var="poll",
    )
    assert out.strip() == "poll"


def test_manager_stays_bound_to_the_trio_it_was_installed_into() -> None:
    # trio can be re-imported in-process (trio's own test-suite does it); the
    # manager must keep using the run context of the trio that created it.
    out = run_python(
        """
        import sys
        from supervisord_qnx.iomanager import select_io_backend
        assert select_io_backend() == "poll"
        import trio as old_trio
        for name in [m for m in sys.modules if m == "trio" or m.startswith("trio.")]:
            del sys.modules[name]
        import trio as new_trio
        assert new_trio is not old_trio
        async def main():
            a, b = old_trio.socket.socketpair()
            with a, b:
                await a.send(b"x")
                await b.recv(1)
            print(old_trio.lowlevel.current_statistics().io_statistics.backend)
        old_trio.run(main)
        """,
        env_var="poll",
    )
    assert out.strip() == "poll"


def test_install_inside_trio_run_is_refused() -> None:
    out = run_python(
        """
        import trio
        from supervisord_qnx.iomanager import select_io_backend
        async def main():
            try:
                select_io_backend()
            except RuntimeError as exc:
                print("refused:", exc)
        trio.run(main)
        """,
        env_var="poll",
    )
    assert out.startswith("refused:")
    assert "before trio.run" in out


def test_simulated_qnx_plain_trio_import_fails() -> None:
    # Sanity check of the simulation itself: stock trio refuses to import.
    out = run_python(
        QNX_PRELUDE,
        """
        try:
            import trio
        except NotImplementedError as exc:
            print("NotImplementedError", exc)
        """,
        env_var=None,
    )
    assert out.strip() == "NotImplementedError unsupported platform"


@pytest.mark.parametrize("env_var", [None, "poll"])
def test_simulated_qnx_imports_and_runs(env_var: str | None) -> None:
    out = run_python(
        QNX_PRELUDE,
        """
        from supervisord_qnx.iomanager import select_io_backend
        assert select_io_backend() == "poll"
        import trio
        # The import-time placeholder is gone again.
        assert not hasattr(select, "kqueue")
        # No pidfds here: child exits are detected with waitid(), not kqueue.
        print("child-watcher", trio._subprocess.wait_child_exiting.__module__)
        """,
        ROUND_TRIPS,
        env_var=env_var,
    )
    assert out.split("\n")[:5] == [
        "child-watcher trio._subprocess_platform.waitid",
        "backend poll",
        "socketpair ping",
        "unix UNIX",
        "process hello",
    ]


def test_simulated_qnx_native_is_refused() -> None:
    env = dict(os.environ, **{ENV_VAR: "native"})
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(QNX_PRELUDE)
            + "from supervisord_qnx.iomanager import select_io_backend\nselect_io_backend()\n",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "neither epoll nor kqueue" in proc.stderr
