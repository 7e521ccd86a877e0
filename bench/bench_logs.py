"""Worker logs under a flood: what a worker writing as fast as it can costs everyone else.

One supervisord-qnx daemon (portable backend, subprocess) runs ``--floods`` tenants whose
worker writes numbered lines as fast as it can into its log (``max_size = 1MiB``,
``keep = 3``) and one quiet tenant. Measured:

* **status latency**: ``--calls`` ``status`` calls on one connection from another
  client, p50/p99, first with the flooding tenants stopped, then while they flood.
* **throughput**: bytes per second the writers put into the files while flooding.
* **daemon CPU** while flooding (the daemon never touches a worker's output).
* **writer memory**: each log writer's RSS and PSS (``/proc/<pid>/smaps_rollup``; PSS
  shares the interpreter's pages between the writers).
* **bound**: the largest a worker's log files together ever were, sampled.

    .venv/bin/python bench/bench_logs.py [--floods 1] [--seconds 5] [--calls 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

from supervisord_qnx.control.client import Client

DAEMON = str(Path(sys.executable).parent / "supervisord-qnx")
MAX_SIZE, KEEP = 1 << 20, 3
FLOOD = (
    "import os\n"
    "i = 0\n"
    "while True:\n"
    "    os.write(1, b''.join(b'%09d xxxxxxxxxxxxxxxxxxxxxx\\n' % n for n in range(i, i + 2000)))\n"
    "    i += 2000\n"
)


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def status_latency(client: Client, calls: int) -> dict[str, float]:
    took = []
    for _ in range(calls):
        t0 = time.perf_counter()
        client.call("status")
        took.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": statistics.median(took), "p99_ms": percentile(took, 0.99)}


def children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        out += [int(p) for p in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return {"rss_kib": fields["Rss"], "pss_kib": fields["Pss"]}


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def log_bytes(directory: Path) -> int:
    total = 0
    for entry in os.scandir(directory) if directory.exists() else []:
        try:
            total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            pass
    return total


def run(floods: int, seconds: float, calls: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="sqnx-bench-logs-"))
    sock = Path(tempfile.gettempdir()) / f"sqnx-bl-{uuid.uuid4().hex[:8]}.sock"
    (root / "tenants.d").mkdir()
    (root / "daemon.toml").write_text(
        textwrap.dedent(
            f"""
            [daemon]
            socket = "{sock}"
            state_dir = "state"
            log_dir = "log"
            backend = "portable"
            enforcement = "best-effort"
            [[partition]]
            name = "tenants"
            flags = ["hierarchical"]
            """
        )
    )
    for k in range(floods):
        (root / "tenants.d" / f"flood{k}.toml").write_text(
            f'autostart = false\nlog = {{ max_size = "{MAX_SIZE}", keep = {KEEP} }}\n'
            f"[[worker]]\nname = 'w'\ncommand = {json.dumps([sys.executable, '-c', FLOOD])}\n"
        )
    (root / "tenants.d" / "quiet.toml").write_text(
        "[[worker]]\nname = 'w'\ncommand = ['sleep', '1000']\n"
    )
    with open(root / "daemon.out", "wb") as out:
        daemon = subprocess.Popen(
            [DAEMON, "--config", str(root / "daemon.toml")], stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline and daemon.poll() is None, "daemon did not start"
            time.sleep(0.05)
        time.sleep(0.5)
        with Client(sock) as client:
            quiet = status_latency(client, calls)
            for k in range(floods):
                client.call("start", tenant=f"flood{k}", wait=True)
            time.sleep(1.0)
            dirs = [root / "log" / "tenants" / f"flood{k}" for k in range(floods)]
            writers = [
                p
                for p in children(daemon.pid)
                if "logwriter" in (cmd := Path(f"/proc/{p}/cmdline").read_text())
                # Not the writer server that forks them (supervise/logserver.py).
                and "--serve" not in cmd.split("\0")
            ]
            flooding = status_latency(client, calls)
            # CPU and throughput over a window without control calls: the daemon's own
            # share of a flood.
            cpu0, t0 = cpu_seconds(daemon.pid), time.monotonic()
            written0 = _progress(dirs)
            biggest = 0
            while time.monotonic() - t0 < seconds:
                biggest = max([biggest, *(log_bytes(d) for d in dirs)])
                time.sleep(0.01)
            elapsed = time.monotonic() - t0
            daemon_cpu = (cpu_seconds(daemon.pid) - cpu0) / elapsed * 100
            written = _progress(dirs) - written0
            mem = [memory_kib(p) for p in writers]
            for k in range(floods):
                client.call("stop", tenant=f"flood{k}", wait=True)
            client.call("shutdown")
        daemon.wait(30)
        shutil.rmtree(root)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
        sock.unlink(missing_ok=True)
    return {
        "floods": floods,
        "status_quiet": quiet,
        "status_flooding": flooding,
        "throughput_mib_s": written / elapsed / (1 << 20),
        "daemon_cpu_percent_while_flooding": daemon_cpu,
        "writers": mem,
        "largest_log_bytes": biggest,
        "bound_bytes": MAX_SIZE * (KEEP + 1),
    }


def _progress(dirs: list[Path]) -> int:
    """Bytes written so far, from each worker's newest numbered line (files rotate away,
    so their sizes cannot tell)."""
    line_len = len(b"000000000 xxxxxxxxxxxxxxxxxxxxxx\n")
    total = 0
    for d in dirs:
        for _ in range(100):
            try:
                data = (d / "w-0.log").read_bytes()[-200:]
                break
            except FileNotFoundError:
                time.sleep(0.001)
        else:
            continue
        last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        total += (int(last.split()[0]) + 1) * line_len
    return total


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--floods", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = run(args.floods, args.seconds, args.calls)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    q, f = result["status_quiet"], result["status_flooding"]
    print(f"flooding tenants: {result['floods']}")
    print(f"status quiet:     p50 {q['p50_ms']:.2f} ms  p99 {q['p99_ms']:.2f} ms")
    print(f"status flooding:  p50 {f['p50_ms']:.2f} ms  p99 {f['p99_ms']:.2f} ms")
    print(f"throughput:       {result['throughput_mib_s']:.1f} MiB/s into the files")
    print(f"daemon CPU:       {result['daemon_cpu_percent_while_flooding']:.1f} % while flooding")
    for m in result["writers"]:
        print(f"writer memory:    RSS {m['rss_kib']} KiB  PSS {m['pss_kib']} KiB")
    print(f"largest log:      {result['largest_log_bytes']} bytes (bound {result['bound_bytes']})")


if __name__ == "__main__":
    main()
