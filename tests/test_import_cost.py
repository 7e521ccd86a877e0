"""What the daemon imports before its first spawn is start-up time and resident memory
every operator pays (issue 14). Libraries that only some requests need are imported by
those requests: here, prometheus_client, at the first ``metrics`` call or textfile write
(tests/test_metrics.py checks that the metrics themselves are whole)."""

from __future__ import annotations

import subprocess
import sys


def test_the_daemon_does_not_import_prometheus_client_before_it_renders_metrics() -> None:
    code = (
        "import sys\n"
        "from supervisord_qnx import daemon\n"
        "from supervisord_qnx.control import methods, metrics\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False", out
