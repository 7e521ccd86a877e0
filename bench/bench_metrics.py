"""The cost of the ``metrics`` method at N workers, next to ``status`` and ``partitions``.

The daemon runs from its own CLI with N tenants of one ``sleep 1000`` worker each (so N
tenant partitions under one group), every worker running. Then, on one connection of
the blocking client, ``--calls`` calls of each method back to back: p50/p95/max latency
as the client sees it, and the size of the answer. ``metrics`` reads every partition's
figures (``/proc`` for portable, cgroup files for cgroup1), like ``partitions`` does.

    .venv/bin/python bench/bench_metrics.py [--count 100] [--calls 50] [--backend portable]
        [--json]

``--backend cgroup1`` (root, writable v1 controllers) uses a unique cgroup root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from supervisord_qnx.control.client import Client

BIN = Path(sys.executable).parent


def write_config(root: Path, count: int, backend: str) -> tuple[Path, Path]:
    sock = Path(tempfile.gettempdir()) / f"sqnx-bench-{uuid.uuid4().hex[:8]}.sock"
    (root / "tenants.d").mkdir(parents=True)
    lines = [
        "[daemon]",
        f'socket = "{sock}"',
        'state_dir = "state"',
        'log_dir = "log"',
        f'backend = "{backend}"',
        'enforcement = "best-effort"',
    ]
    if backend == "cgroup1":
        lines.append(f'cgroup_root = "sqnx-bench-{uuid.uuid4().hex[:8]}"')
    lines += ["[[partition]]", 'name = "tenants"', 'flags = ["hierarchical"]']
    (root / "daemon.toml").write_text("\n".join(lines) + "\n")
    for i in range(count):
        (root / "tenants.d" / f"t{i}.toml").write_text(
            'memory = { max = "64MiB" }\npids = 16\n'
            '[[worker]]\nname = "w"\ncommand = ["sleep", "1000"]\n'
        )
    return root / "daemon.toml", sock


def timed(client: Client, method: str, calls: int) -> dict[str, Any]:
    seconds, size = [], 0
    for _ in range(calls):
        t0 = time.perf_counter()
        result = client.call(method)
        seconds.append(time.perf_counter() - t0)
        size = len(json.dumps(result)) if not isinstance(result, str) else len(result)
    seconds.sort()
    return {
        "method": method,
        "p50_ms": round(statistics.median(seconds) * 1000, 2),
        "p95_ms": round(seconds[min(len(seconds) - 1, round(0.95 * (len(seconds) - 1)))] * 1000, 2),
        "max_ms": round(seconds[-1] * 1000, 2),
        "answer_bytes": size,
    }


def run(count: int, calls: int, backend: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config, sock = write_config(Path(tmp), count, backend)
        with open(Path(tmp) / "daemon.out", "w") as out:
            proc = subprocess.Popen(
                [str(BIN / "supervisord-qnx"), "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with Client(sock, timeout=30) as c:
                        status = c.call("status")
                    if sum(w["state"] == "running" for w in status) == count:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((Path(tmp) / "daemon.out").read_text()[-2000:])
                time.sleep(0.1)
            with Client(sock, timeout=60) as c:
                rows = [timed(c, m, calls) for m in ("status", "partitions", "metrics")]
            return {"backend": backend, "workers": count, "calls": calls, "rows": rows}
        finally:
            proc.terminate()
            proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--backend", default="portable", choices=["portable", "cgroup1"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = run(args.count, args.calls, args.backend)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['backend']}, {result['workers']} workers, {result['calls']} calls each")
    print(f"{'method':<12}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'bytes':>10}")
    for r in result["rows"]:
        print(
            f"{r['method']:<12}{r['p50_ms']:>9}{r['p95_ms']:>9}{r['max_ms']:>9}"
            f"{r['answer_bytes']:>10}"
        )


if __name__ == "__main__":
    main()
