"""Shared fixtures: tenant configs written to disk, and the real daemon run in-process
(with trio, in the test's own nursery) or as a subprocess through its CLI."""

from __future__ import annotations

import os
import socket
import stat
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Before anything imports trio: with SUPERVISORD_QNX_IO=poll the whole run,
# daemon included, uses the poll(2) I/O back end (as on QNX).
from supervisord_qnx.iomanager import select_io_backend

IO_BACKEND = select_io_backend()

# ruff: noqa: E402 - the imports below must come after the I/O back end is chosen

import msgpack
import pytest
import trio

from supervisord_qnx.config.load import load
from supervisord_qnx.control.client import AsyncClient
from supervisord_qnx.daemon import Daemon, admit, make_backend
from tests.cgroup_helpers import CgroupRoot, require_cgroup1

if TYPE_CHECKING:
    from tests.daemonproc import DaemonProc

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def pytest_addoption(parser: pytest.Parser) -> None:
    # Here, not in tests/soak/conftest.py: pytest reads options only from the conftest
    # files it loads first, and `pytest --soak-seconds N` must work from the top.
    parser.addoption(
        "--soak-seconds",
        type=float,
        default=None,
        help="length of the chaos soak in tests/soak (default 60, or "
        "$SUPERVISORD_QNX_SOAK_SECONDS); make soak runs a long one",
    )


def pytest_report_header() -> list[str]:
    return [f"supervisord-qnx trio I/O back end: {IO_BACKEND}"]


def reachable_by_workers(path: Path) -> None:
    """Workers run as unprivileged users (docs/security.md#tenants), while pytest makes
    its temporary directories 0700 for root: let any user pass through every directory
    above ``path`` (search only, no listing) and write into ``path`` itself (sticky, as
    /tmp), so that test workers can reach their scripts and write their probe files."""
    path.chmod(0o1777)
    for parent in path.parents:
        st = parent.stat()
        if st.st_uid == os.geteuid() and not st.st_mode & 0o001:
            parent.chmod(stat.S_IMODE(st.st_mode) | 0o711)


class ConfigDir:
    """A temporary config directory: ``daemon.toml`` plus ``tenants.d/*.toml``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "tenants.d").mkdir(parents=True, exist_ok=True)
        reachable_by_workers(root)
        # Short (sun_path limit), and in $TMPDIR: the cgroup2 VM points it at a tmpfs,
        # since a Unix socket cannot live on the 9p share it sees this machine through.
        self.socket = Path(tempfile.gettempdir()) / f"sqnx-{uuid.uuid4().hex[:10]}.sock"
        self.daemon_extra = ""
        self.partitions = textwrap.dedent(
            """
            [[partition]]
            name = "tenants"
            flags = ["hierarchical"]
            """
        )

    @property
    def path(self) -> Path:
        return self.root / "daemon.toml"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def worker_log(self, tenant: str, leaf: str) -> Path:
        """The newest log file of one worker instance (``leaf`` such as ``w-0``)."""
        return self.log_dir / "tenants" / tenant / f"{leaf}.log"

    def write(self, backend: str = "portable", **daemon: Any) -> Path:
        lines = [
            "[daemon]",
            f'socket = "{self.socket}"',
            'state_dir = "state"',
            'log_dir = "log"',
            f'backend = "{backend}"',
            'enforcement = "best-effort"',
            "sample_interval = 0.05",
        ]
        for key, value in daemon.items():
            lines.append(f"{key} = {_toml(value)}")
        self.path.write_text("\n".join(lines) + "\n" + self.daemon_extra + self.partitions)
        return self.path

    def tenant(self, name: str, body: str) -> Path:
        path = self.root / "tenants.d" / f"{name}.toml"
        path.write_text(textwrap.dedent(body))
        return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def worker_py(code: str) -> str:
    """A TOML argv for a Python worker running ``code``."""
    return "[" + ", ".join(f'"{a}"' for a in (PY, "-u", "-c")) + ", " + _json(code) + "]"


def _json(s: str) -> str:
    import json

    return json.dumps(s)


@pytest.fixture
def cfg(tmp_path: Path) -> Iterator[ConfigDir]:
    c = ConfigDir(tmp_path)
    yield c
    c.socket.unlink(missing_ok=True)


class Running:
    def __init__(self, daemon: Daemon, socket: Path) -> None:
        self.daemon = daemon
        self.socket = socket

    async def call(self, method: str, **params: Any) -> Any:
        # A connection per call: a client's nursery must not outlive the test task
        # (pytest-trio tears fixtures down in other tasks).
        result: Any = None
        error: BaseException | None = None
        async with AsyncClient(self.socket) as client:
            try:
                result = await client.call(method, **params)
            except Exception as exc:  # noqa: BLE001 - re-raised below, as it was
                # Raised outside the client's nursery, so it is not wrapped in a group.
                error = exc
        if error is not None:
            raise error
        return result

    async def worker(self, name: str) -> dict[str, Any]:
        for w in await self.call("status"):
            if w["name"] == name:
                return dict(w)
        raise KeyError(name)

    async def wait_for(
        self, name: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 15.0
    ) -> dict[str, Any]:
        """Poll ``status`` (as a user would) until ``pred`` holds for the worker."""
        with trio.fail_after(timeout):
            while True:
                w = await self.worker(name)
                if pred(w):
                    return w
                await trio.sleep(0.02)


@pytest.fixture
async def start_daemon(nursery: trio.Nursery, cfg: ConfigDir) -> AsyncIterator[Callable[..., Any]]:
    """Start the real daemon in this test's trio run; returns a ``Running`` handle."""
    started: list[Daemon] = []

    async def start(backend: str = "portable", **daemon_opts: Any) -> Running:
        cfg.write(backend=backend, **daemon_opts)
        config = load(cfg.path)
        be = make_backend(config)
        tree, warnings = admit(config, be)
        d = Daemon(config, be, tree, warnings)
        d.io_backend = IO_BACKEND
        await nursery.start(d.run)
        started.append(d)
        return Running(d, cfg.socket)

    yield start
    for d in started:
        d.request_shutdown()
    with trio.fail_after(30):
        for d in started:
            await d.stopped.wait()


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def cg() -> Iterator[CgroupRoot]:
    """A unique cgroup v1 root for one test; fails the test if anything is left under it.

    Request it before ``start_daemon`` so that it is torn down after the daemon stopped."""
    require_cgroup1()
    root = CgroupRoot()
    yield root
    left = root.leftovers()
    if left:
        root.reap()
    assert not left, f"cgroup directories left behind: {left}"


def pipelined(path: Path, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Send every request in one write, then read every answer (blocking: run it in a
    thread). A request left unanswered when the daemon closes the connection is None."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(str(path))
    try:
        s.sendall(b"".join(msgpack.packb([0, i, m, [p]]) for i, (m, p) in enumerate(calls)))
        unpacker = msgpack.Unpacker(raw=False)
        answers: dict[int, Any] = {}
        while len(answers) < len(calls):
            data = s.recv(65536)
            if not data:
                break
            unpacker.feed(data)
            for msg in unpacker:
                answers[msg[1]] = msg
        return [answers.get(i) for i in range(len(calls))]
    finally:
        s.close()


@pytest.fixture
def daemon_procs(cfg: ConfigDir) -> Iterator[Callable[..., DaemonProc]]:
    """Start the daemon as a subprocess on ``cfg`` (``daemon_procs(*extra_args)``, as
    often as a test needs); each is stopped gracefully after the test, so it leaves no
    worker behind, and SIGKILLed only if that hangs."""
    import subprocess

    from tests.daemonproc import DaemonProc  # it imports this module: not at the top

    started: list[DaemonProc] = []

    def start(*extra: str) -> DaemonProc:
        started.append(DaemonProc(cfg, *extra))
        return started[-1]

    yield start
    for d in started:
        if d.proc.poll() is None:
            try:
                d.stop()
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait(timeout=30)
