"""Micro-benchmark: trio on its native back end vs. the poll(2) back end.

    .venv/bin/python bench/bench_trio_poll.py [--round-trips 10000] [--idle-seconds 2]

Each back end runs in a fresh interpreter (the back end is chosen at start-up
through ``SUPERVISORD_QNX_IO``, exactly as in the daemon).  Measured:

* ping-pong: one byte bounced over a socketpair between two tasks, N round
  trips; also with 1000 extra sockets that have a task blocked on them, since
  poll() hands the whole interest set to the kernel on every wait;
* idle: CPU time consumed while the loop sleeps with 1000 blocked readers
  (should be ~0 for both: nothing may spin).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(round_trips: int, idle_seconds: float) -> None:
    from supervisord_qnx.iomanager import select_io_backend

    select_io_backend()
    import trio

    async def ping_pong(idle_fds: int) -> float:
        idle = [trio.socket.socketpair() for _ in range(idle_fds)]
        a, b = trio.socket.socketpair()
        async with trio.open_nursery() as nursery:
            for _, sock in idle:
                nursery.start_soon(sock.recv, 1)

            async def echo() -> None:
                for _ in range(round_trips):
                    await b.send(await b.recv(1))

            nursery.start_soon(echo)
            start = time.perf_counter()
            for _ in range(round_trips):
                await a.send(b"x")
                await a.recv(1)
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        for x, y in [*idle, (a, b)]:
            x.close()
            y.close()
        return elapsed

    async def idle_cpu() -> float:
        idle = [trio.socket.socketpair() for _ in range(1000)]
        async with trio.open_nursery() as nursery:
            for _, sock in idle:
                nursery.start_soon(sock.recv, 1)
            await trio.sleep(0.2)  # let everything block
            cpu = time.process_time()
            await trio.sleep(idle_seconds)
            cpu = time.process_time() - cpu
            nursery.cancel_scope.cancel()
        for x, y in idle:
            x.close()
            y.close()
        return cpu

    async def main() -> None:
        stats = trio.lowlevel.current_statistics().io_statistics
        result = {
            "backend": stats.backend,
            "ping_pong_s": await ping_pong(0),
            "ping_pong_1000_idle_s": await ping_pong(1000),
            "idle_cpu_s": await idle_cpu(),
        }
        print(json.dumps(result))

    trio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per back end; best is kept")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.round_trips, args.idle_seconds)
        return

    print(f"{args.round_trips} socketpair round trips, best of {args.repeat}; idle 1000 readers")
    header = (
        f"{'backend':8} {'ping-pong':>10} {'us/rt':>7} {'+1000 idle fds':>15} {'us/rt':>7} "
        f"{'idle CPU':>10}"
    )
    print(header)
    for mode in ("native", "poll"):
        runs = []
        for _ in range(args.repeat):
            env = dict(os.environ, SUPERVISORD_QNX_IO=mode)
            argv = [sys.executable, __file__, "--child"]
            argv += [
                "--round-trips",
                str(args.round_trips),
                "--idle-seconds",
                str(args.idle_seconds),
            ]
            out = subprocess.run(
                argv,
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs.append(json.loads(out))
        best = {key: min(r[key] for r in runs) for key in runs[0] if key != "backend"}
        per_rt = 1e6 / args.round_trips
        print(
            f"{runs[0]['backend']:8} {best['ping_pong_s']:9.3f}s "
            f"{best['ping_pong_s'] * per_rt:7.1f} {best['ping_pong_1000_idle_s']:14.3f}s "
            f"{best['ping_pong_1000_idle_s'] * per_rt:7.1f} "
            f"{best['idle_cpu_s'] * 1000:8.1f}ms"
        )


if __name__ == "__main__":
    main()
