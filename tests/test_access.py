"""Who may use the control socket: roles from the peer's real credentials.

Clients here are real processes running as other uids (``subprocess`` with ``user=``,
``group=`` and ``extra_groups=``, i.e. setuid/setgid/setgroups before exec), talking to
a real daemon over its socket; the socket lives in the sticky ``/tmp`` that they can
reach. The uids are arbitrary numbers without passwd entries, except 65534 (nobody).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisord_qnx.config.load import ConfigError, load
from supervisord_qnx.config.model import ControlSpec, Grant
from supervisord_qnx.control import peercred
from supervisord_qnx.control.access import METHOD_ACCESS, Authorizer, Role, standing
from supervisord_qnx.control.methods import Methods
from tests.conftest import ConfigDir, cli_env, wait_until, worker_py
from tests.daemonproc import CTL, DaemonProc, ctl

VIEWER = 65534
OPERATOR = 47101
STRANGER = 47102
GROUPIE = 47103  # a viewer through its primary group
SUPPLEMENTARY = 47104  # a viewer through a supplementary group
OPS_GID = 47150
SLEEPY = worker_py("import time\nwhile True: time.sleep(1)")
DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"


# -- the policy, without sockets -------------------------------------------------------


def grants(*items: dict[str, Any]) -> ControlSpec:
    return ControlSpec(grant=[Grant(**g) for g in items])


def test_root_and_the_daemons_own_uid_are_admin_without_any_grant() -> None:
    assert standing(ControlSpec(), 0, frozenset()).role is Role.ADMIN
    assert standing(ControlSpec(), 4242, frozenset(), daemon_uid=4242).role is Role.ADMIN
    assert standing(ControlSpec(), 4243, frozenset(), daemon_uid=4242).role is Role.NONE


def test_grants_add_up_to_the_highest_role_and_the_union_of_tenants() -> None:
    spec = grants(
        {"role": "viewer", "groups": [OPS_GID]},
        {"role": "operator", "uids": [OPERATOR], "tenants": ["a"]},
        {"role": "operator", "groups": [OPS_GID], "tenants": ["b"]},
    )
    st = standing(spec, OPERATOR, frozenset({OPS_GID}), daemon_uid=0)
    assert (st.role, st.tenants) == (Role.OPERATOR, frozenset({"a", "b"}))
    assert standing(spec, STRANGER, frozenset({OPS_GID}), daemon_uid=0).tenants == {"b"}
    assert standing(spec, STRANGER, frozenset({1}), daemon_uid=0).role is Role.NONE


def test_peer_credentials_are_the_kernels_view_of_the_other_end() -> None:
    # A real connected pair in this process: the kernel reports our own pid, uid, gid
    # and supplementary groups (SO_PEERCRED and SO_PEERGROUPS).
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = peercred.read(a)
    assert peer is not None
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert set(peer.groups) == set(os.getgroups())


def test_a_peer_of_unknown_identity_is_the_owner_only_on_a_private_socket(
    tmp_path: Path,
) -> None:
    (tmp_path / "daemon.toml").write_text("[daemon]\nsocket_mode = 0o600\n")
    private = load(tmp_path / "daemon.toml")
    (tmp_path / "daemon.toml").write_text("[daemon]\nsocket_mode = 0o660\n")
    shared = load(tmp_path / "daemon.toml")
    assert Authorizer(lambda: private, lambda _: None).standing_of(None).role is Role.ADMIN
    assert Authorizer(lambda: shared, lambda _: None).standing_of(None).role is Role.NONE


def test_every_served_method_has_a_row_in_the_access_table_and_in_the_doc() -> None:
    class NoDaemon:  # the table is built from the methods alone; none is called here
        pass

    served = set(Methods(NoDaemon()).table.names())  # type: ignore[arg-type]
    assert set(METHOD_ACCESS) == served
    doc = DOC.read_text()
    section = doc[doc.index("## The control socket") : doc.index("### Grants")]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\w+) \|", section, flags=re.M))
    assert rows == {m: a.value for m, a in METHOD_ACCESS.items()}


def test_bad_grants_are_located_config_errors(tmp_path: Path) -> None:
    (tmp_path / "daemon.toml").write_text(
        """
[daemon]
socket_group = "no-such-group-xq"

[[control.grant]]
role = "operator"
uids = ["no-such-user-xq", 1000]

[[control.grant]]
role = "viewer"
groups = [5]
tenants = ["a"]

[[control.grant]]
role = "admin"

[control]
max_depth = 1
"""
    )
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "daemon.toml")
    got = {(p.key, p.reason) for p in info.value.problems}
    assert got == {
        ("control.grant[0]", "an operator grant needs tenants: the tenants it may act on"),
        ("control.grant[1]", "tenants is for operator grants; a viewer has no tenant list"),
        ("control.grant[2]", "a grant needs uids or groups: whom it is for"),
        ("control.max_depth", "Input should be greater than or equal to 4"),
    }
    # Names are checked against the user database once the shapes are right.
    (tmp_path / "daemon.toml").write_text(
        """
[daemon]
socket_group = "no-such-group-xq"

[[control.grant]]
role = "operator"
uids = ["no-such-user-xq", 1000]
groups = ["no-such-group-xq"]
tenants = ["a"]
"""
    )
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "daemon.toml")
    assert {str(p).split(": ", 1)[1] for p in info.value.problems} == {
        "daemon.socket_group: no group named 'no-such-group-xq'",
        "control.grant[0].uids: no user named 'no-such-user-xq'",
        "control.grant[0].groups: no group named 'no-such-group-xq'",
    }


# -- real connections from other uids ------------------------------------------------

pytestmark = pytest.mark.integration


def as_uid(
    sock: Path, uid: int, *args: str, gid: int | None = None, groups: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``supervisorctl-qnx`` run as ``uid`` (and ``gid``, default the same number) with
    exactly ``groups`` as its supplementary groups (none of root's), through setpriv(1)."""
    ids = ["--reuid", str(uid), "--regid", str(uid if gid is None else gid)]
    ids += ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return subprocess.run(
        ["setpriv", *ids, CTL, "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env=cli_env(),
    )


def two_tenants(cfg: ConfigDir) -> tuple[str, str]:
    # Unique per test: the portable backend finds a leaf's processes by their
    # environment tag, system-wide.
    tag = uuid.uuid4().hex[:6]
    a, b = f"acc-a-{tag}", f"acc-b-{tag}"
    for name in (a, b):
        cfg.tenant(name, f"[[worker]]\nname = 'w'\ncommand = {SLEEPY}\n")
    return a, b


def grant_config(cfg: ConfigDir, a: str, **daemon: Any) -> None:
    cfg.daemon_extra = f"""
[[control.grant]]
role = "viewer"
uids = [{VIEWER}]
groups = [{OPS_GID}]

[[control.grant]]
role = "operator"
uids = [{OPERATOR}]
tenants = ["{a}"]
"""
    daemon.setdefault("socket_mode", 0o666)
    cfg.write(**daemon)


def state(sock: Path, tenant: str) -> str:
    out = ctl(sock, "--json", "status", tenant).stdout
    return str(__import__("json").loads(out)[0]["state"])


@pytest.fixture
def subprocess_daemon(daemon_procs: Callable[..., DaemonProc]) -> Callable[..., DaemonProc]:
    return daemon_procs


@pytest.fixture
def granted(
    cfg: ConfigDir, subprocess_daemon: Callable[[], DaemonProc]
) -> tuple[DaemonProc, str, str]:
    a, b = two_tenants(cfg)
    grant_config(cfg, a)
    d = subprocess_daemon()
    wait_until(lambda: state(cfg.socket, a) == state(cfg.socket, b) == "running", 30, "running")
    return d, a, b


def test_a_viewer_reads_but_cannot_stop(cfg: ConfigDir, granted: Any) -> None:
    d, a, _ = granted
    r = as_uid(cfg.socket, VIEWER, "--json", "status")
    assert r.returncode == 0, r.stderr
    assert as_uid(cfg.socket, VIEWER, "partitions").returncode == 0
    r = as_uid(cfg.socket, VIEWER, "stop", a)
    assert r.returncode == 6, (r.returncode, r.stderr)
    assert f"stop of tenant '{a}'" in r.stderr and "needs operator" in r.stderr
    assert "permission_denied" in r.stderr
    assert as_uid(cfg.socket, VIEWER, "logs", a).returncode == 6
    assert as_uid(cfg.socket, VIEWER, "shutdown").returncode == 6
    assert state(cfg.socket, a) == "running"
    # Logged with who it was.
    wait_until(lambda: f"peer_uid={VIEWER}" in d.output(), 10, "the denial in the log")
    line = next(x for x in d.output().splitlines() if "control request denied" in x)
    assert "method=stop" in line and "peer_pid=" in line


def test_an_operator_acts_on_its_tenants_only(cfg: ConfigDir, granted: Any) -> None:
    _, a, b = granted
    r = as_uid(cfg.socket, OPERATOR, "stop", b)
    assert r.returncode == 6 and f"not of '{b}'" in r.stderr, r.stderr
    assert as_uid(cfg.socket, OPERATOR, "logs", b).returncode == 6
    assert as_uid(cfg.socket, OPERATOR, "set", f"tenants/{b}", "--pids-max", "50").returncode == 6
    assert as_uid(cfg.socket, OPERATOR, "reload").returncode == 6
    assert state(cfg.socket, b) == "running"
    r = as_uid(cfg.socket, OPERATOR, "stop", a)
    assert r.returncode == 0, r.stderr
    assert state(cfg.socket, a) == "stopped"
    assert as_uid(cfg.socket, OPERATOR, "start", a).returncode == 0
    # Reads are not limited to its tenants.
    assert as_uid(cfg.socket, OPERATOR, "status", b).returncode == 0


def test_jobs_are_checked_by_the_tenant_of_their_partition(cfg: ConfigDir, granted: Any) -> None:
    _, a, b = granted
    r = as_uid(cfg.socket, OPERATOR, "run", "-p", f"tenants/{a}", "--", "echo", "hello")
    assert r.returncode == 0 and "hello" in r.stdout, r.stderr
    r = as_uid(cfg.socket, OPERATOR, "run", "-p", f"tenants/{b}", "--", "echo", "hello")
    assert r.returncode == 125 and "permission denied" in r.stderr, r.stderr
    # A job root started in b: the operator of a may not read its output.
    root = ctl(cfg.socket, "run", "--no-wait", "-p", f"tenants/{b}", "--", "sleep", "30")
    job_id = root.stdout.strip()
    r = as_uid(cfg.socket, OPERATOR, "job", job_id)
    assert r.returncode == 125 and f"job of tenant '{b}'" in r.stderr, r.stderr
    assert as_uid(cfg.socket, VIEWER, "job", job_id).returncode == 125


def test_an_unlisted_uid_may_do_nothing_not_even_subscribe(cfg: ConfigDir, granted: Any) -> None:
    r = as_uid(cfg.socket, STRANGER, "ping")
    assert r.returncode == 6 and "has no role" in r.stderr, r.stderr
    r = as_uid(cfg.socket, STRANGER, "events", "-f")
    assert r.returncode == 6 and "subscribe" in r.stderr, r.stderr
    assert as_uid(cfg.socket, STRANGER, "events").returncode == 6


def test_group_grants_count_primary_and_supplementary_groups(cfg: ConfigDir, granted: Any) -> None:
    assert as_uid(cfg.socket, GROUPIE, "ping", gid=OPS_GID).returncode == 0
    r = as_uid(cfg.socket, SUPPLEMENTARY, "ping", groups=(OPS_GID,))
    assert r.returncode == 0, r.stderr
    assert as_uid(cfg.socket, SUPPLEMENTARY, "stop", "x", groups=(OPS_GID,)).returncode == 6
    assert as_uid(cfg.socket, SUPPLEMENTARY, "ping").returncode == 6


def test_socket_group_lets_that_group_connect_and_no_one_else(
    cfg: ConfigDir, subprocess_daemon: Callable[[], DaemonProc]
) -> None:
    a, _ = two_tenants(cfg)
    grant_config(cfg, a, socket_mode=0o660, socket_group=OPS_GID)
    subprocess_daemon()
    st = os.stat(cfg.socket)
    assert (st.st_gid, st.st_mode & 0o777) == (OPS_GID, 0o660)
    assert as_uid(cfg.socket, GROUPIE, "ping", gid=OPS_GID).returncode == 0
    # Named by a grant but not in the group: the kernel refuses the connect itself.
    r = as_uid(cfg.socket, VIEWER, "ping")
    assert r.returncode == 4 and "ermission denied" in r.stderr, r.stderr
