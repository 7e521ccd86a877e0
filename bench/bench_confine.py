"""What the confinement wrappers (docs/security.md#tenants) add to a worker's start.

    .venv/bin/python bench/bench_confine.py [-n 200]

Starts ``/bin/true`` ``n`` times each way and reports the median and p90 of spawn to
exit: plainly, and behind the wrappers a default tenant gets (``/bin/sh`` for umask and
``RLIMIT_CORE``, then ``setpriv`` to ``nobody`` with ``no_new_privs`` and empty
capability sets). Run as root (the uid switch needs it). Interleaved, so that load from
other processes falls on both alike.
"""

from __future__ import annotations

import argparse
import os
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


def once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, close_fds=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=200)
    n = p.parse_args().n
    if os.geteuid() != 0:
        raise SystemExit("run as root: the wrappers switch to another user")
    plain, wrapped = ["/bin/true"], wrapped_argv(SETTINGS, ["/bin/true"])
    times: dict[str, list[float]] = {"plain": [], "wrapped": []}
    for _ in range(n):
        times["plain"].append(once(plain))
        times["wrapped"].append(once(wrapped))
    for name, t in times.items():
        t.sort()
        print(
            f"{name:8} median {statistics.median(t) * 1000:6.2f} ms   "
            f"p90 {t[int(len(t) * 0.9)] * 1000:6.2f} ms"
        )
    extra = statistics.median(times["wrapped"]) - statistics.median(times["plain"])
    print(f"wrappers add {extra * 1000:.2f} ms per start (median); argv: {wrapped[:-1]}")


if __name__ == "__main__":
    main()
