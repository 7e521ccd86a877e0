"""What the confinement wrappers (docs/security.md#tenants) add to a worker's start.

    .venv/bin/python bench/bench_confine.py [-n 200]

Starts ``/bin/true`` ``n`` times each way and reports the median and p90 of spawn to
exit, and the CPU time the started processes used (user + system, from
``RUSAGE_CHILDREN``: what a loaded machine does not distort): plainly, and behind the
wrappers a default tenant gets (``/bin/sh`` for umask and ``RLIMIT_CORE``, then
``setpriv`` to ``nobody`` with ``no_new_privs`` and empty capability sets). Run as root
(the uid switch needs it). Interleaved, so that load from other processes falls on both
alike.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import time

from supervisord_qnx.partition.process import ProcessSettings, wrapped_argv

SETTINGS = ProcessSettings(
    uid=65534,
    gid=65534,
    groups=(),
    no_new_privs=True,
    capabilities=(),
    umask=0o077,
    rlimit_core=0,
)


def once(argv: list[str]) -> tuple[float, float]:
    """Wall time and the children's CPU time of one start."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, close_fds=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=200)
    n = p.parse_args().n
    if os.geteuid() != 0:
        raise SystemExit("run as root: the wrappers switch to another user")
    plain, wrapped = ["/bin/true"], wrapped_argv(SETTINGS, ["/bin/true"])
    times: dict[str, list[float]] = {"plain": [], "wrapped": []}
    cpu: dict[str, float] = {"plain": 0.0, "wrapped": 0.0}
    for _ in range(n):
        for name, argv in (("plain", plain), ("wrapped", wrapped)):
            wall, used = once(argv)
            times[name].append(wall)
            cpu[name] += used
    for name, t in times.items():
        t.sort()
        print(
            f"{name:8} median {statistics.median(t) * 1000:6.2f} ms   "
            f"p90 {t[int(len(t) * 0.9)] * 1000:6.2f} ms   "
            f"cpu {cpu[name] / n * 1000:5.2f} ms per start"
        )
    extra = statistics.median(times["wrapped"]) - statistics.median(times["plain"])
    extra_cpu = (cpu["wrapped"] - cpu["plain"]) / n
    print(
        f"wrappers add {extra * 1000:.2f} ms per start (median wall), "
        f"{extra_cpu * 1000:.2f} ms CPU; argv: {wrapped[:-1]}"
    )


if __name__ == "__main__":
    main()
