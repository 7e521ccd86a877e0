"""sd_notify against real AF_UNIX datagram sockets (path and abstract)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from supervisord_qnx import sdnotify


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    path = f"/tmp/sdn-{uuid.uuid4().hex[:10]}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)


def test_messages_reach_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path}
    assert sdnotify.notify(sdnotify.READY, env) is True
    assert sock.recv(4096) == b"READY=1"
    both = "\n".join([sdnotify.STOPPING, sdnotify.status("stopping 3 tenants\nin order")])
    sdnotify.notify(both, env)
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping 3 tenants in order"


def test_messages_reach_an_abstract_socket() -> None:
    name = f"sdn-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert sdnotify.notify(sdnotify.WATCHDOG, {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_no_socket_is_a_no_op_and_a_dead_one_an_error() -> None:
    assert sdnotify.notify(sdnotify.READY, {}) is False
    assert sdnotify.notify(sdnotify.READY, {"NOTIFY_SOCKET": ""}) is False
    with pytest.raises(OSError):
        sdnotify.notify(sdnotify.READY, {"NOTIFY_SOCKET": f"/tmp/gone-{uuid.uuid4().hex}"})
    with pytest.raises(ValueError, match="vsock"):
        sdnotify.notify(sdnotify.READY, {"NOTIFY_SOCKET": "vsock:2:1234"})


def test_watchdog_period_is_half_the_interval_for_our_pid_only() -> None:
    assert sdnotify.watchdog_period({"WATCHDOG_USEC": "10000000"}) == 5.0
    mine = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert sdnotify.watchdog_period(mine) == 1.5
    assert sdnotify.watchdog_period({**mine, "WATCHDOG_PID": "1"}, pid=2) is None
    assert sdnotify.watchdog_period({}) is None
    assert sdnotify.watchdog_period({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_period({"WATCHDOG_USEC": "soon"}) is None


def test_tenants_do_not_inherit_the_managers_variables() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "HOME": "/"}
    assert sdnotify.clean_env(env) == {"HOME": "/"}
