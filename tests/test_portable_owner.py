"""Two portable daemons with the same tenant names (docs/security.md, "Tenants"): each
counts, and kills at a memory limit, only its own processes.

The portable backend finds a partition's processes by the environment tag
``SUPERVISORD_QNX_LEAF=<partition>:<leaf>``, which says nothing of which daemon set it;
``SUPERVISORD_QNX_OWNER`` (a digest of the daemon's state_dir) does. Two daemons side by
side were already kept apart by looking only among each daemon's own descendants; a
daemon running *under* another (a tenant that is itself a supervisor) was not: its
workers are the outer daemon's descendants and carry the outer daemon's tags. Here the
inner daemon's ``app`` worker holds 64 MiB, the outer daemon's ``app`` partition allows
40 MiB and its own ``app`` worker uses a few: the outer daemon must neither count the
inner worker nor kill anything."""

from __future__ import annotations

import time
from pathlib import Path

from supervisord_qnx.control.client import Client
from tests.conftest import ConfigDir, wait_until, worker_py
from tests.test_cli import DAEMON, DaemonProc

SLEEPER = worker_py("import time\nwhile True: time.sleep(1)\n")
HOG = worker_py(
    "import time\nhoard = bytearray(64 << 20)\nhoard[::4096] = b'x' * len(hoard[::4096])\n"
    "while True: time.sleep(1)\n"
)


def app_tenant(command: str, memory: str | None = None, head: str = "") -> str:
    limit = f'memory = {{ max = "{memory}" }}\n' if memory else ""
    return f'{head}{limit}[[worker]]\nname = "w"\ncommand = {command}\n'


def rss_mib(pid: object) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def call(sock: Path, method: str, **params: object) -> object:
    with Client(sock, timeout=30) as c:
        return c.call(method, **params)


def app(sock: Path) -> dict[str, object]:
    rows = call(sock, "status", tenant="app")
    assert isinstance(rows, list) and len(rows) == 1
    return dict(rows[0])


def usage(sock: Path, path: str) -> dict[str, object]:
    report = call(sock, "partitions")
    assert isinstance(report, dict)
    stack = [report["tree"]]
    while stack:
        node = stack.pop()
        if node["path"] == path:
            return dict(node["usage"])
        stack.extend(node["children"])
    raise AssertionError(f"no partition {path}")


def test_a_daemon_under_another_keeps_its_processes_apart(tmp_path: Path) -> None:
    inner = ConfigDir(tmp_path / "inner")
    inner.tenant("app", app_tenant(HOG, head='user = "root"\nallow_root = true\n'))
    inner.write(backend="portable")
    outer = ConfigDir(tmp_path / "outer")
    outer.tenant("app", app_tenant(SLEEPER, memory="40MiB"))
    outer.tenant(
        "inner",
        # Root with what a daemon needs to start its workers under their identities.
        'user = "root"\nallow_root = true\n'
        'capabilities = ["CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN",'
        ' "CAP_FOWNER", "CAP_DAC_OVERRIDE"]\n'
        f'[[worker]]\nname = "w"\n'
        f'command = ["{DAEMON}", "--config", "{inner.path}"]\n',
    )
    outer.write(backend="portable")
    d = DaemonProc(outer)
    try:
        wait_until(lambda: inner.socket.exists(), 30, "the inner daemon's socket")
        wait_until(lambda: app(inner.socket)["state"] == "running", 30, "the inner app")
        hog = app(inner.socket)
        # Its 64 MiB resident (read, never signalled: the inner daemon started it).
        wait_until(lambda: rss_mib(hog["pid"]) >= 60, 30, "the inner app's 64 MiB")
        wait_until(lambda: app(outer.socket)["state"] == "running", 30, "the outer app")
        mine = app(outer.socket)
        # Many samples of the outer daemon's accounting (every 50 ms) with the hog's
        # 64 MiB resident: a partition of 40 MiB that counted it would have been killed.
        time.sleep(2)
        figures = usage(outer.socket, "tenants/app")
        assert figures["pids"] == [mine["pid"]], (figures, hog["pid"])
        assert isinstance(figures["memory_current"], int)
        assert figures["memory_current"] < 40 << 20, figures
        after, hog_after = app(outer.socket), app(inner.socket)
        assert (after["pid"], after["restarts"]) == (mine["pid"], mine["restarts"]), after
        assert (hog_after["pid"], hog_after["restarts"]) == (hog["pid"], hog["restarts"])
        assert "memory-limit" not in str(after) + str(hog_after)
    finally:
        d.stop()
        inner.socket.unlink(missing_ok=True)
        outer.socket.unlink(missing_ok=True)
