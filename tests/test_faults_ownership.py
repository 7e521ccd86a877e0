"""Fault 6 of issue 8: two daemons on one state directory or one cgroup root.

The second daemon's start-up reaping used to SIGKILL the first one's workers and remove
its partitions (different sockets, or the socket file deleted), and of two simultaneous
starts of one config the loser's clean-up destroyed the shared partitions. Now the first
daemon holds locks on its state directory and its cgroup root for its whole life, and a
second one refuses before reaping anything: exit code 3, a message naming what is taken,
and the first daemon's worker keeps its pid and its partition.

Real daemons through the CLI, real cgroups (each test its own root), real workers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cgroup_helpers import CgroupRoot, require_cgroup1
from tests.conftest import REPO, ConfigDir, cli_env, pid_alive, wait_until, worker_py
from tests.daemonproc import DAEMON, ctl

pytestmark = pytest.mark.integration

EXIT_CANNOT_START = 3  # supervisord-qnx --help: another daemon owns socket, state or root
SLEEPER = worker_py("import time\nprint('up', flush=True)\ntime.sleep(1000)")


class Daemons:
    """Daemons this test started (and only those are ever signalled)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, config: Path, out: Path) -> subprocess.Popen[bytes]:
        with open(out, "w") as log:
            proc = subprocess.Popen(
                [DAEMON, "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=cli_env(),
            )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    d = Daemons()
    yield d
    d.stop_all()


def one_tenant(cfg: ConfigDir, backend: str, **daemon: object) -> None:
    cfg.tenant(
        "alpha",
        f"""
        memory = {{ max = "64MiB" }}
        [[worker]]
        name = "w"
        command = {SLEEPER}
        """,
    )
    cfg.write(backend=backend, **daemon)


def second_config(cfg: ConfigDir, name: str) -> tuple[Path, Path]:
    """The same config (same state_dir, same cgroup root) with another socket path."""
    socket = Path(f"/tmp/sqnx-{uuid.uuid4().hex[:10]}.sock")
    text = cfg.path.read_text().replace(f'socket = "{cfg.socket}"', f'socket = "{socket}"')
    path = cfg.root / name
    path.write_text(text)
    return path, socket


def serving(sock: Path) -> bool:
    return ctl(sock, "ping").returncode == 0


def worker(sock: Path) -> dict:
    return dict(json.loads(ctl(sock, "--json", "status", "alpha").stdout)[0])


def cgroup_of(pid: int, controller: str = "memory") -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return path
    raise KeyError(controller)


def refused(proc: subprocess.Popen[bytes], out: Path) -> str:
    code = proc.wait(60)
    text = out.read_text()
    assert code == EXIT_CANNOT_START, text
    return text


# --------------------------------------------------------------------------- portable


def test_portable_second_daemon_on_same_state_dir_refuses(cfg: ConfigDir, daemons) -> None:
    one_tenant(cfg, "portable")
    first = daemons.start(cfg.path, cfg.root / "first.out")
    wait_until(lambda: serving(cfg.socket), 30, "the first daemon")
    # The socket is served before autostart has finished: wait for the worker.
    wait_until(lambda: worker(cfg.socket)["state"] == "running", 30, "the worker to run")
    before = worker(cfg.socket)
    config2, socket2 = second_config(cfg, "second.toml")
    second = daemons.start(config2, cfg.root / "second.out")
    text = refused(second, cfg.root / "second.out")
    assert "owns the state directory" in text and f"pid {first.pid}" in text
    assert not socket2.exists()
    # The first daemon and its worker are untouched.
    after = worker(cfg.socket)
    assert after["pid"] == before["pid"] and after["state"] == "running"
    assert pid_alive(before["pid"])


# --------------------------------------------------------------------------- cgroup v1


def test_cgroup1_second_daemon_on_same_cgroup_root_refuses(
    cg: CgroupRoot, tmp_path: Path, daemons
) -> None:
    """Two configs with their own state directories and sockets, one cgroup root."""
    a = ConfigDir(tmp_path / "a")
    b = ConfigDir(tmp_path / "b")
    try:
        one_tenant(a, "cgroup1", cgroup_root=cg.name)
        one_tenant(b, "cgroup1", cgroup_root=cg.name)
        daemons.start(a.path, tmp_path / "a.out")
        wait_until(lambda: serving(a.socket), 30, "the first daemon")
        wait_until(lambda: worker(a.socket)["state"] == "running", 30, "the worker to run")
        before = worker(a.socket)
        leaf = cg.dir("memory", "tenants", "alpha", "@w-0")
        wait_until(lambda: cgroup_of(before["pid"]).endswith("/tenants/alpha/@w-0"), 5, "leaf")
        second = daemons.start(b.path, tmp_path / "b.out")
        text = refused(second, tmp_path / "b.out")
        assert "owns the partition root" in text, text
        # Nothing reaped: same pid, still in its leaf, the partitions still there.
        after = worker(a.socket)
        assert after["pid"] == before["pid"] and after["state"] == "running"
        assert pid_alive(before["pid"])
        assert before["pid"] in [int(p) for p in (leaf / "cgroup.procs").read_text().split()]
    finally:
        a.socket.unlink(missing_ok=True)
        b.socket.unlink(missing_ok=True)


def test_cgroup1_simultaneous_start_of_one_config(cg: CgroupRoot, cfg: ConfigDir, daemons) -> None:
    """A loser used to reap the winner's worker and, on its way out, destroy the shared
    partitions: nothing was left running. Four at once, and 24 more tenants (whose
    partitions take a while to create before the socket is bound), so that some pass
    the socket probe before the winner has bound the socket."""
    for i in range(24):
        cfg.tenant(f"t{i}", f'memory = {{ max = "16MiB" }}\n[[worker]]\nname = "w"\n'
                   f"command = {SLEEPER}\n")  # fmt: skip
    one_tenant(cfg, "cgroup1", cgroup_root=cg.name)
    outs = [cfg.root / f"d{i}.out" for i in range(4)]
    procs = [daemons.start(cfg.path, out) for out in outs]
    wait_until(lambda: serving(cfg.socket), 30, "one daemon to serve")
    # All but one give up, with the documented code; the other runs on.
    deadline = time.monotonic() + 60
    while sum(p.poll() is None for p in procs) > 1:
        assert time.monotonic() < deadline, [p.poll() for p in procs]
        time.sleep(0.05)
    for proc, out in zip(procs, outs, strict=True):
        if proc.poll() is not None:
            text = refused(proc, out)
            assert "owns" in text or "already serving" in text, text
    (winner,) = [p for p in procs if p.poll() is None]
    # The winner serves its socket before its 25 tenants are all up: let it finish.
    wait_until(lambda: worker(cfg.socket)["state"] == "running", 30, "the worker to run")
    w = worker(cfg.socket)
    wait_until(lambda: cgroup_of(w["pid"]).endswith("/tenants/alpha/@w-0"), 5, "the leaf")
    time.sleep(0.5)  # had a loser destroyed anything, the worker would be gone by now
    assert winner.poll() is None
    assert pid_alive(w["pid"]) and worker(cfg.socket)["pid"] == w["pid"]
    assert cg.dir("memory", "tenants", "alpha").is_dir()


def test_cgroup1_socket_deleted_then_second_start_refuses(
    cg: CgroupRoot, cfg: ConfigDir, daemons
) -> None:
    """With its socket file gone the first daemon is unreachable, not dead: the socket
    probe cannot see it, the locks still do."""
    one_tenant(cfg, "cgroup1", cgroup_root=cg.name)
    first = daemons.start(cfg.path, cfg.root / "first.out")
    wait_until(lambda: serving(cfg.socket), 30, "the first daemon")
    wait_until(lambda: worker(cfg.socket)["state"] == "running", 30, "the worker to run")
    pid = worker(cfg.socket)["pid"]
    wait_until(lambda: cgroup_of(pid).endswith("/tenants/alpha/@w-0"), 5, "the leaf")
    cfg.socket.unlink()
    second = daemons.start(cfg.path, cfg.root / "second.out")
    text = refused(second, cfg.root / "second.out")
    assert "owns the state directory" in text and f"pid {first.pid}" in text, text
    assert not cfg.socket.exists()  # the refusing daemon did not bind one either
    assert pid_alive(pid) and cgroup_of(pid).endswith("/tenants/alpha/@w-0")
    # The first one still shuts down cleanly (the cg fixture checks nothing is left).
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0
    assert not pid_alive(pid)


# --------------------------------------------------------------------------- example config


def test_example_config_roots_differ_between_checkouts(tmp_path: Path) -> None:
    """config/supervisord.toml used to name one fixed cgroup root, so two checkouts'
    `make run` reaped each other. The root now carries a hash of the config's directory."""
    require_cgroup1()

    def root_of(checkout: Path) -> str:
        config = str(checkout / "supervisord.toml")
        check = subprocess.run(
            [DAEMON, "--config", config, "--check", "--json", "--backend", "cgroup1"],
            capture_output=True,
            text=True,
            timeout=60,
            env=cli_env(),
        )
        assert check.returncode == 0, check.stderr
        names = json.loads(check.stdout)["os_names"]
        found = re.search(r"/(supervisord-qnx-example-[0-9a-f]{8})/", names["tenants"])
        assert found, names["tenants"]
        return found.group(1)

    one, two = tmp_path / "one" / "config", tmp_path / "two" / "config"
    for copy in (one, two):
        shutil.copytree(REPO / "config", copy)
    assert root_of(one) != root_of(two)
    assert root_of(one) == root_of(one)  # stable: a restart finds its own leftovers
    assert os.path.basename(root_of(REPO / "config")).startswith("supervisord-qnx-example-")
