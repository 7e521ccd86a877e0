"""The daemon's socket, state and log directories: created private, refused when another
user could tamper with them (issue 13, "Safe files").

The traps are planted by a real other user: ``setpriv`` runs ``mkdir``/``ln -s`` as uid
65534 in a root-owned sticky directory under ``/tmp`` (the shape of ``/tmp`` itself),
made per test. The daemon runs as root, as on a target.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisord_qnx.safedirs import UnsafePath, secure_dir
from tests.conftest import ConfigDir, cli_env, wait_until, worker_py
from tests.daemonproc import DAEMON, DaemonProc, ctl

OTHER = 65534
OPS_GID = 47150


@pytest.fixture
def shared() -> Iterator[Path]:
    """A root-owned, world-writable sticky directory that uid 65534 can reach."""
    path = Path(tempfile.mkdtemp(prefix="sqnx-shared-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path)


def as_other(*argv: str) -> None:
    subprocess.run(
        ["setpriv", "--reuid", str(OTHER), "--regid", str(OTHER), "--clear-groups", *argv],
        check=True,
        timeout=30,
        cwd="/",
    )


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- the checks, on real directories -----------------------------------------------


def test_missing_directories_are_created_private_whatever_the_umask(shared: Path) -> None:
    old = os.umask(0)
    try:
        secure_dir(shared / "a" / "b")
        secure_dir(shared / "s", mode=0o750, group=OPS_GID, socket_dir=True)
    finally:
        os.umask(old)
    assert mode_of(shared / "a") == mode_of(shared / "a" / "b") == 0o700
    st = os.stat(shared / "s")
    assert (stat.S_IMODE(st.st_mode), st.st_gid, st.st_uid) == (0o750, OPS_GID, 0)
    # Existing and ours: accepted as it is, again and again.
    secure_dir(shared / "a" / "b")


def test_a_symlink_planted_by_another_user_is_refused(shared: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    as_other("ln", "-s", str(target), str(shared / "log"))
    with pytest.raises(UnsafePath, match=f"symlink owned by uid {OTHER}"):
        secure_dir(shared / "log" / "tenants")
    assert list(target.iterdir()) == []  # nothing was created through it


def test_a_symlink_root_made_is_followed(shared: Path, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (shared / "link").symlink_to(tmp_path / "real")
    secure_dir(shared / "link" / "state")
    assert mode_of(tmp_path / "real" / "state") == 0o700


def test_a_directory_another_user_made_inside_a_sticky_one_is_refused(shared: Path) -> None:
    as_other("mkdir", str(shared / "run"))
    # As the socket's own directory (the socket hijack) ...
    with pytest.raises(UnsafePath, match=r"run \(owned by uid 65534.*not the daemon's"):
        secure_dir(shared / "run", socket_dir=True)
    # ... and on the way to one.
    with pytest.raises(UnsafePath, match="belongs to another user"):
        secure_dir(shared / "run" / "state")
    assert list((shared / "run").iterdir()) == []


def test_writable_by_others_is_refused_but_a_sticky_root_tmp_is_a_fine_parent(
    shared: Path,
) -> None:
    loose = shared / "loose"
    loose.mkdir()
    loose.chmod(0o775)  # group-writable, not sticky
    with pytest.raises(UnsafePath, match="writable by group or others"):
        secure_dir(loose)
    with pytest.raises(UnsafePath, match="writable by others"):
        secure_dir(loose / "state")
    # The shared sticky directory itself: fine above ours, not as a state or log
    # directory, fine as the socket's (the sticky bit guards the socket).
    secure_dir(shared / "mine")
    with pytest.raises(UnsafePath, match=r"not the daemon's|writable"):
        secure_dir(shared)
    secure_dir(shared, socket_dir=True)


def test_a_file_where_the_directory_should_be_is_refused(shared: Path) -> None:
    (shared / "f").write_text("x")
    with pytest.raises(UnsafePath, match="not a directory"):
        secure_dir(shared / "f" / "g")


# -- the daemon ------------------------------------------------------------------------


def daemon_config(cfg: ConfigDir, shared: Path, **daemon: Any) -> str:
    """A daemon config whose state and log directories are in ``shared``."""
    tenant = f"safe-{uuid.uuid4().hex[:6]}"
    cfg.tenant(tenant, f"[[worker]]\nname = 'w'\ncommand = {worker_py('print(1, flush=True)')}\n")
    cfg.write(**daemon)
    text = cfg.path.read_text()
    text = text.replace('state_dir = "state"', f'state_dir = "{shared / "state"}"')
    text = text.replace('log_dir = "log"', f'log_dir = "{shared / "log"}"')
    cfg.path.write_text(text)
    return tenant


def test_the_daemon_refuses_to_start_on_a_planted_log_directory(
    cfg: ConfigDir, shared: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "logrotate.d"
    victim.mkdir()
    as_other("ln", "-s", str(victim), str(shared / "log"))
    daemon_config(cfg, shared)
    r = subprocess.run(
        [DAEMON, "--config", str(cfg.path)], capture_output=True, text=True, timeout=60,
        env=cli_env(),
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "refusing to start" in r.stderr and f"symlink owned by uid {OTHER}" in r.stderr
    assert list(victim.iterdir()) == []
    assert not cfg.socket.exists()


def test_the_daemon_creates_its_directories_private_under_umask_000(
    cfg: ConfigDir, shared: Path
) -> None:
    sock = shared / "run" / "c.sock"
    cfg.socket = sock
    tenant = daemon_config(cfg, shared, socket_group=OPS_GID)
    old = os.umask(0)  # what a careless service manager might leave: the child inherits it
    try:
        d = DaemonProc(cfg)
    finally:
        os.umask(old)
    try:
        assert mode_of(shared / "log") == 0o700
        # Searchable, not listable: unprivileged workers reach their own files in it.
        assert mode_of(shared / "state") == 0o711
        assert mode_of(shared / "run") == 0o750 and os.stat(shared / "run").st_gid == OPS_GID

        # Nothing the daemon made is for others (the lock would be 0644 under umask 000).
        def made_now() -> list[Path]:
            return [*(shared / "log").rglob("*"), *(shared / "state").rglob("*")]

        # The socket is served before autostart is through: wait for the tenant's files.
        wait_until(lambda: any(tenant in str(p) for p in made_now()), 30, "the tenant's files")
        made = made_now()
        assert shared / "state" / "daemon.lock" in made
        assert [(str(p), oct(mode_of(p))) for p in made if mode_of(p) & 0o007] == []
        assert ctl(sock, "ping").returncode == 0
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=30)
