"""Example worker: prints a heartbeat once a second until stopped.

Tenant files pass the tenant's name in $SUPERVISORD_QNX_TENANT; a worker can
read its partition from $SUPERVISORD_QNX_PARTITION.
"""

import os
import signal
import sys
import time

interval = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
tenant = os.environ.get("SUPERVISORD_QNX_TENANT", "?")
worker = os.environ.get("SUPERVISORD_QNX_WORKER", "?")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
n = 0
while True:
    n += 1
    print(f"{tenant}/{worker} beat {n} pid={os.getpid()}", flush=True)
    time.sleep(interval)
