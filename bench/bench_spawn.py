"""Spawn cost of attach-before-exec: 100 workers through ``backend.spawn`` vs plain Popen.

The floor is ``subprocess.Popen(["sleep", "60"])`` with the same arguments the backends
use (``close_fds``, ``start_new_session``, fds for stdio). Each backend strategy then starts
the same 100 workers, each in its own leaf of one tenant partition (leaf creation
included, as at a first start). Target: the chosen strategy at most 2x the floor.

Strategies (``cgroup1``): ``thread`` (move the spawning thread, keep vfork - the default),
``preexec`` (``preexec_fn`` writes the pid: forces fork), ``shim`` (``/bin/sh`` writes ``$$``
then execs - what cgroup2 uses). Run as root on a machine with writable v1 controllers:

    .venv/bin/python bench/bench_spawn.py [--count 100] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial

from supervisord_qnx.partition.backend import SpawnRequest
from supervisord_qnx.partition.cgroup_v1 import Cgroup1Backend
from supervisord_qnx.partition.tree import Partition

ARGV = ["sleep", "60"]


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait()


def floor(count: int, null: int) -> float:
    env = dict(os.environ)
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ARGV,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=null,
            stderr=null,
            close_fds=True,
            start_new_session=True,
        )
        for _ in range(count)
    ]
    elapsed = time.perf_counter() - t0
    _kill(procs)
    return elapsed


def with_backend(strategy: str, count: int, null: int, fresh_leaves: bool) -> float:
    backend = Cgroup1Backend(instance=f"bench-{uuid.uuid4().hex[:8]}")
    backend.spawn_strategy = strategy  # type: ignore[assignment]
    backend.create(Partition("bench", memory_max=1 << 30, pids_max=4 * count))
    env = dict(os.environ)
    reqs = [SpawnRequest("bench", f"w-{i}", ARGV, None, env, null, null) for i in range(count)]
    if not fresh_leaves:
        for r in reqs:
            backend.ensure_leaf(r.partition, r.leaf)
    try:
        t0 = time.perf_counter()
        procs = [backend.spawn(r) for r in reqs]
        # The shim attaches itself after Popen returns (before it execs the worker): the
        # clock stops when every worker is inside its leaf, which thread/preexec already
        # are when Popen returns - so all variants are timed to the same point.
        deadline = time.monotonic() + 5
        while (missing := {p.pid for p in procs} - set(backend.pids("bench"))) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.0005)
        elapsed = time.perf_counter() - t0
        assert not missing, f"{strategy}: {len(missing)} workers not in their leaves: {missing}"
    finally:
        backend.destroy("bench")
        backend.close()
    for p in procs:
        p.wait()
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="best of N")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    why = Cgroup1Backend.probe()
    if why is not None:
        print(f"cgroup1 unavailable: {why}", file=sys.stderr)
        return 2
    null = os.open(os.devnull, os.O_WRONLY)
    variants: dict[str, Callable[[], float]] = {
        "plain Popen (floor)": lambda: floor(args.count, null)
    }
    for strategy in ("thread", "preexec", "shim"):
        for fresh in (True, False):
            label = f"cgroup1 {strategy}" + (" (+ leaf mkdir)" if fresh else " (leaves exist)")
            variants[label] = partial(with_backend, strategy, args.count, null, fresh)
    # Rounds interleave the variants so machine load drifts hit all of them alike; each
    # variant reports its best round.
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for label, fn in variants.items():
            times[label].append(fn())
    base = min(times["plain Popen (floor)"])
    rows: list[dict[str, object]] = [
        {"variant": k, "seconds": min(v), "median": sorted(v)[len(v) // 2], "ratio": min(v) / base}
        for k, v in times.items()
    ]
    if args.json:
        print(json.dumps({"count": args.count, "rounds": args.rounds, "results": rows}))
    else:
        print(f"{args.count} spawns of {' '.join(ARGV)}, best of {args.rounds}")
        print(f"{'variant':<36} {'total ms':>9} {'per spawn µs':>13} {'x floor':>8}")
        for r in rows:
            s = float(r["seconds"])  # type: ignore[arg-type]
            print(
                f"{r['variant']!s:<36} {s * 1e3:>9.1f} {s / args.count * 1e6:>13.0f} "
                f"{float(r['ratio']):>8.2f}"  # type: ignore[arg-type]
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
