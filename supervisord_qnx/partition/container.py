"""The ``container`` flag (the seed's ``PartitionFlags::CONTAINER``) for exec'd workers on
Linux (docs/security.md#container): new PID, mount, IPC and UTS namespaces (and an empty
network namespace with ``network = "none"``), ``/proc`` mounted for the new PID
namespace, a private ``/tmp`` and ``/dev/shm``, and every mount read-only except the
tenant's ``writable`` paths.

The wrapper is util-linux ``unshare --fork`` running a small ``/bin/sh`` init (pid 1 of
the new namespace) that sets up the mounts as root, then starts the rest of the chain
(the privilege drop, then the program) and waits for it. Why an init of our own: the
supervised pid stays ``unshare`` (the process the daemon started, whose exit it sees,
with the program's exit status), and a pid 1 gets only the signals it has a handler
for, so a program that relies on SIGTERM's default action would never stop: the init
traps the usual stop signals and passes them on. ``unshare`` itself blocks SIGINT and
SIGTERM while it waits; the daemon's stop signal goes to the whole process group, so it
reaches the init and the program directly.

A leaf module: nothing of the package is imported.
"""

from __future__ import annotations

import os
import shutil
import sys

UNSHARE = "unshare"
_SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"

# $1 = number of writable paths, then the paths, then the rest of the chain.
INIT = r"""
n=$1; shift
mask=$(umask); umask 022  # the tenant's umask again for its program, below
keep="/proc /dev /tmp"
# Writable paths are held on a staging tmpfs while /tmp is replaced (a path under /tmp
# would vanish under the private one), then moved back into place.
mount -t tmpfs -o mode=0700 tmpfs /dev/shm || exit 126
i=0
while [ "$i" -lt "$n" ]; do
    eval "w$i=\$1"
    if [ -d "$1" ]; then mkdir /dev/shm/$i; else : > /dev/shm/$i; fi
    mount --bind -- "$1" /dev/shm/$i || exit 126
    keep="$keep $1"; shift; i=$((i+1))
done
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp || exit 126
i=0
while [ "$i" -lt "$n" ]; do
    eval "p=\$w$i"
    if [ -d /dev/shm/$i ]; then mkdir -p -- "$p"
    else mkdir -p -- "${p%/*}" && { [ -e "$p" ] || : > "$p"; }; fi
    mount --move /dev/shm/$i "$p" || exit 126
    i=$((i+1))
done
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm || exit 126
while read -r _ _ _ _ mp _; do
    skip=
    for k in $keep; do
        case "$mp" in "$k"|"$k"/*) skip=1 ;; esac
    done
    [ -n "$skip" ] || mount -o remount,bind,ro -- "$mp" 2>/dev/null \
        || [ "$mp" != / ] || exit 126
done < /proc/self/mountinfo
umask "$mask"
for s in TERM INT HUP QUIT USR1 USR2; do trap "kill -$s \$child 2>/dev/null" $s; done
"$@" &
child=$!
while :; do
    wait $child; status=$?
    kill -0 $child 2>/dev/null || exit $status
done
"""


def unavailable() -> str | None:
    """Why this machine cannot give workers namespaces, or ``None``."""
    if not sys.platform.startswith("linux"):
        return "namespaces need Linux"
    if os.geteuid() != 0:
        return "only a root daemon can create namespaces for its workers"
    if shutil.which(UNSHARE, path=_SYSTEM_PATH) is None:
        return "util-linux unshare is not installed"
    return None


def wrappers(writable: tuple[str, ...], network_none: bool) -> list[str]:
    """``unshare`` and the init, as an argv prefix (the chain continues after it)."""
    unshare = shutil.which(UNSHARE, path=_SYSTEM_PATH) or UNSHARE
    namespaces = ["--pid", "--fork", "--mount-proc", "--mount", "--uts", "--ipc"]
    if network_none:
        namespaces.append("--net")
    return [
        unshare,
        *namespaces,
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        INIT,
        "sh",
        str(len(writable)),
        *writable,
    ]
