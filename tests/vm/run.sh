#!/bin/sh
# Boot Debian's distribution kernel (linux-image-amd64) over this machine's own
# filesystem with virtme-ng and run the cgroup2 suite inside it: a pure cgroup v2
# machine with the memory controller, which the CI host (hybrid layout) lacks.
#
# Usage: tests/vm/run.sh [pytest args...]   (from `make test-cgroup2`, as root)
#
# KVM is not usable on the CI host, so QEMU emulates the CPU (--disable-kvm): the boot
# takes ~30 s and everything inside runs several times slower than on the host. The
# guest's exit status is the suite's (vng --exec passes it through), and `timeout`
# bounds a hung guest. No tty is needed: stdin is /dev/null and the console is
# captured as plain output.
set -eu
cd "$(dirname "$0")/../.."
repo=$(pwd)

# The newest distribution kernel installed under /boot; the host's own kernel is not a
# Debian one and has no modules directory to boot with.
kernel=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
if [ -z "$kernel" ]; then
    echo "no kernel under /boot: apt-get install linux-image-amd64" >&2
    exit 1
fi
# The budget is 10 minutes (about 4-5 measured on the CI host); the timeout only stops
# a hung guest, with room for a loaded machine.
VM_TIMEOUT=${VM_TIMEOUT:-900}
echo "== booting $kernel under QEMU (software emulation, stopped after ${VM_TIMEOUT}s)"
# vng looks for its helpers (virtme-run) on PATH.
PATH="$repo/.venv/bin:$PATH"
export PATH
quoted=""
for arg in "$@"; do
    quoted="$quoted '$(printf %s "$arg" | sed "s/'/'\\\\''/g")'"
done
# QEMU opens our stdout by name and truncates it when it is a file, which would wipe what
# was printed before: hand it a pipe, and carry the guest's status around the pipe.
status_file=$(mktemp)
trap 'rm -f "$status_file"' EXIT
start=$(date +%s)
{
    status=0
    timeout --kill-after=10 "$VM_TIMEOUT" vng --run "$kernel" --disable-kvm \
        --cpus 2 --memory 2G --cwd "$repo" \
        --exec "sh tests/vm/guest.sh$quoted" </dev/null 2>&1 || status=$?
    echo "$status" >"$status_file"
} | cat
status=$(cat "$status_file")
echo "== cgroup2 VM run: exit $status after $(( $(date +%s) - start ))s (boot included)"
exit "$status"
