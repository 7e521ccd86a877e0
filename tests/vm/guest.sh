#!/bin/sh
# Runs inside the cgroup2 VM (see run.sh). The guest sees this machine's filesystem over
# 9p, read-only: the venv and the checkout are used in place, and nothing is written
# back (no bytecode, no pytest cache).
set -eu
echo "== guest: $(uname -r), cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
# A Unix socket cannot live on 9p, and the guest's /tmp is an overlay over the host's
# /tmp: give the daemons' sockets, state and logs a tmpfs of their own. Not over /tmp
# itself: the checkout (and its venv) may live there, as a CI clone can.
scratch=/dev/shm/sqnx
mkdir -p "$scratch"
mount -t tmpfs -o size=512m,mode=1777 sqnx-tmp "$scratch"
export TMPDIR="$scratch"
export PYTHONDONTWRITEBYTECODE=1
# Every cgroup2 test must run here: a skip is a failure (tests/cgroup_helpers.py).
export SUPERVISORD_QNX_REQUIRE_CGROUP2=1
# Under emulation a test takes up to ~20x its host time: if pytest-timeout is installed,
# give each test 5 minutes here (run.sh bounds the whole VM anyway).
timeout_arg=""
if ls .venv/lib/python3*/site-packages/pytest_timeout.py >/dev/null 2>&1; then
    timeout_arg="--timeout=300"
fi
start=$(date +%s)
status=0
# No hypothesis plugin: none of these tests uses it, and under emulation every import
# counts (the interpreter starts about a hundred times slower than on the host).
.venv/bin/python -m pytest -p no:cacheprovider -p no:hypothesispytest -q -ra --durations=15 \
    --basetemp="$scratch/pytest" $timeout_arg \
    tests/test_cgroup2_core.py tests/test_cgroup2_kernel.py tests/test_daemon_cgroup2.py \
    "$@" || status=$?
echo "== guest: pytest exit $status after $(( $(date +%s) - start ))s"
exit "$status"
