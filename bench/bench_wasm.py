"""Start-up cost of the wasm runner: spawn -> first line of guest output, and RSS.

    .venv/bin/python bench/bench_wasm.py [--runs 20] [--json out.json]

Scenarios (each ``--runs`` times, sequentially):

* ``python-floor``: ``python -c "print(1)"``-like, the interpreter's own floor;
* ``runner-cold``: the runner on heartbeat.wat with an empty cache dir (compile);
* ``runner-cached``: the same with a warm cache (deserialize).

Latency is wall time from just before ``Popen`` to the first line read from the
child's stdout pipe. RSS is ``VmRSS`` from ``/proc/PID/status`` read right after
that first line, while the child is still alive (heartbeat runs until killed).
The runner's RSS with heartbeat (a single 64 KiB page of linear memory) is the
runner's fixed overhead: the supervisor should add it to ``--memory`` when
deriving the cap from the partition's memory maximum.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT = ROOT / "config" / "wasm" / "heartbeat.wat"


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def first_line(cmd: list[str]) -> tuple[float, int | None, str]:
    """Spawn ``cmd``; return (ms to first stdout line, RSS KiB then, that line)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = (time.perf_counter() - t0) * 1000
    rss = rss_kib(proc.pid)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    if proc.stdin:
        proc.stdin.close()
    return elapsed, rss, line.decode().strip()


def runner_cmd(cache_dir: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "supervisord_qnx.wasm.runner",
        "--module",
        str(HEARTBEAT),
        "--cache-dir",
        cache_dir,
    ]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    # nearest-rank percentile: with 20 runs p95 is the 19th value
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def scenario(name: str, runs: int, make_cmd: Any, expect: str) -> dict[str, Any]:
    times, rsses = [], []
    for i in range(runs):
        ms, rss, line = first_line(make_cmd(i))
        if line != expect:
            raise SystemExit(f"{name}: unexpected first line {line!r}")
        times.append(ms)
        if rss is not None:
            rsses.append(rss)
    return {
        "scenario": name,
        "runs": runs,
        "p50_ms": round(pct(times, 50), 1),
        "p95_ms": round(pct(times, 95), 1),
        "min_ms": round(min(times), 1),
        "rss_kib_median": int(statistics.median(rsses)) if rsses else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", help="also write the results here")
    opts = ap.parse_args()

    results = []
    # The floor: an interpreter that prints and then waits (so RSS can be read).
    floor = [sys.executable, "-c", "import sys; print(1, flush=True); sys.stdin.read()"]
    results.append(scenario("python-floor", opts.runs, lambda _i: floor, "1"))
    with tempfile.TemporaryDirectory() as tmp:
        cold_dirs = [os.path.join(tmp, f"cold{i}") for i in range(opts.runs)]
        results.append(
            scenario("runner-cold", opts.runs, lambda i: runner_cmd(cold_dirs[i]), "beat 1")
        )
        warm = os.path.join(tmp, "warm")
        first_line(runner_cmd(warm))  # fill the cache
        results.append(scenario("runner-cached", opts.runs, lambda _i: runner_cmd(warm), "beat 1"))

    header = f"{'scenario':<16}{'runs':>6}{'p50 ms':>10}{'p95 ms':>10}{'min ms':>10}{'RSS KiB':>10}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['scenario']:<16}{r['runs']:>6}{r['p50_ms']:>10}{r['p95_ms']:>10}"
            f"{r['min_ms']:>10}{r['rss_kib_median'] or '-':>10}"
        )
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"python": sys.version.split()[0], "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
