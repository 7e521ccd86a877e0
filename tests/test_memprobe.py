"""The memory probe (supervisord_qnx/memprobe.py): off without its environment variable,
and with it the figures and snapshots docs/reliability.md's investigation reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

from supervisord_qnx import memprobe

# Prints whether the probe started and the threads; then waits (up to 30 s, on a loaded
# machine) for two snapshots, the second written after the first was complete.
PROBE = (
    "import os, pathlib, threading, time\n"
    "from supervisord_qnx import memprobe\n"
    "started = memprobe.start_from_env()\n"
    "print(started, [t.name for t in threading.enumerate()])\n"
    "where = pathlib.Path(os.environ.get(memprobe.ENV_DIR, '/nonexistent'))\n"
    "deadline = time.monotonic() + (30 if started else 0.5)\n"
    "while time.monotonic() < deadline and len(list(where.glob('snap-*'))) < 3:\n"
    "    time.sleep(0.1)\n"
)


def run(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(memprobe.ENV_DIR)}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stdout


def test_off_unless_asked() -> None:
    assert run({}).strip() == "False ['MainThread']"


def test_writes_figures_and_snapshots(tmp_path: Path) -> None:
    out = run(
        {
            memprobe.ENV_DIR: str(tmp_path / "probe"),
            memprobe.ENV_INTERVAL: "0.3",
            memprobe.ENV_FRAMES: "4",
        }
    )
    assert out.startswith("True") and "memprobe" in out
    records = [json.loads(line) for line in (tmp_path / "probe" / "probe.jsonl").open()]
    assert len(records) >= 2
    first = records[0]
    assert first["status"]["VmRSS"] > 0 and first["blocks"] > 0 and first["traced"] > 0
    assert first["types"]["function"] > 100  # live objects counted by type
    snaps = sorted((tmp_path / "probe").glob("snap-*.pickle"))
    assert len(snaps) >= 2
    old, new = (tracemalloc.Snapshot.load(str(p)) for p in snaps[:2])
    assert new.compare_to(old, "traceback") and old.traceback_limit == 4
