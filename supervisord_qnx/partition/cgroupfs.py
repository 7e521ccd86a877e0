"""What the cgroup v1 and cgroup v2 backends share: file I/O that names the partition, the
file and the errno; ``/proc`` parsing; the kill-then-rmdir teardown; the notification set
the ``watch`` loop sleeps on; and the bookkeeping base class both backends derive from.

Notification: why one epoll set
================================

Both cgroup versions tell user space about memory events without polling, each in its own
way:

* **v1** uses ``cgroup.event_control``: we hand the kernel an ``eventfd`` plus an open
  ``memory.oom_control`` (OOM) or ``memory.usage_in_bytes`` (threshold crossing, with the
  threshold in bytes), and the kernel bumps the eventfd's counter on each event - and also
  once when the cgroup is removed.
* **v2** marks ``memory.events`` "modified" on every counter change: inotify sees
  ``IN_MODIFY`` and ``poll()`` on an open fd of the file reports ``POLLPRI`` until the
  file is read again through that fd.

The alternatives we weighed for turning those into trio wake-ups:

* *A trio task per fd* (``wait_readable`` on each eventfd): simple, but leaves appear and
  disappear in ``spawn``/``destroy``, which run in worker threads; handing new fds to the
  watcher then needs a wake-up channel, and closing an fd a task still waits on must go
  through ``notify_closing`` on the trio thread.
* *inotify* (v2 only): needs ``ctypes`` for ``inotify_init1``/``inotify_add_watch``, and the
  watch descriptor still has to be mapped back to a leaf. It buys nothing ``POLLPRI``
  doesn't.
* *Polling the counters* every ``sample_interval``: always works (even on a tmpfs laid out
  like cgroupfs), but an OOM kill is then reported up to an interval late and we spend
  wake-ups on an idle machine.
* **One epoll set** (chosen): every eventfd (v1) and every open ``memory.events`` fd (v2,
  registered for ``EPOLLPRI``) goes into a single ``select.epoll``. ``epoll_ctl`` is
  thread-safe, so ``spawn`` registers a new leaf from its worker thread with no hand-off;
  closing an fd silently drops it from the set; and the watcher needs exactly one
  ``trio.lowlevel.wait_readable(epoll_fd)``. Files that cannot be epolled (``EPERM``: a
  regular file in a test tmpdir) fall back to counter polling.

Every check behind a wake-up is idempotent - it re-reads the kernel counter and compares
with the last value reported - so spurious or coalesced wake-ups cost a read and never
produce a wrong or duplicate event. That matters for v1: the OOM eventfd fires when the
memcg *enters* OOM, before the killer has chosen and counted a victim, so the first read
can still see the old ``oom_kill``; the watcher re-reads an OOM key a few times over the
next two seconds (``OOM_RECHECK_DELAYS``). (The kernel does count the kill before it sends
SIGKILL, so ``leaf_exit_reason``, called after the worker died, never races.)

Teardown
========

``destroy`` kills with ``SIGKILL`` until ``cgroup.procs`` of every directory in the subtree
reads empty, then removes the directories deepest first. A process that forks while we
kill lands in the same cgroup (children are born in their parent's cgroup) and is caught by
the next round; ``pids.max`` bounds how many rounds a fork loop can force. Zombies are no
obstacle: the kernel unlinks a task from its cgroup when it exits, not when it is reaped,
so a killed child of the daemon disappears from ``cgroup.procs`` (and stops blocking
``rmdir``) while still waiting for the daemon's ``waitpid``. We checked this on the 6.x
kernel these tests run on; ``rmdir`` is nevertheless retried briefly on ``EBUSY``, because
a task between "signalled" and "exited" is still a member.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from supervisord_qnx.partition.backend import (
    Backend,
    BackendError,
    BackendEvent,
    BackendUnavailable,
    EventKind,
    EventSink,
    LeafExit,
)
from supervisord_qnx.partition.tree import Partition, PartitionTree

DEFAULT_ROOT = "supervisord-qnx"
LEAF_PREFIX = "@"  # partition names cannot start with "@" (config NAME_PATTERN): no clash
CFS_PERIOD_US = 100_000
UNLIMITED_V1 = 1 << 62  # v1 prints ~2**63 rounded to a page for "no limit"
OOM_RECHECK_DELAYS = (0.02, 0.1, 0.5, 2.0)  # seconds after an OOM notification

# Names the kernel uses for control files; a partition directory named like one would
# collide with (or be refused next to) the files in its parent directory.
_CONTROL_PREFIXES = frozenset(
    {
        "cgroup",
        "memory",
        "cpu",
        "cpuacct",
        "cpuset",
        "io",
        "blkio",
        "pids",
        "rdma",
        "hugetlb",
        "misc",
        "freezer",
        "devices",
        "net_cls",
        "net_prio",
        "perf_event",
    }
)
_CONTROL_NAMES = frozenset({"tasks", "notify_on_release", "release_agent"})


def name_problem(name: str) -> str | None:
    """Why a partition name cannot be a cgroup directory name, or ``None``."""
    if name in _CONTROL_NAMES or ("." in name and name.split(".", 1)[0] in _CONTROL_PREFIXES):
        return f"the name {name!r} clashes with cgroup control files; rename the partition"
    return None


# --------------------------------------------------------------------------- file I/O


def _err(partition: str, path: Path | str, what: str, exc: OSError) -> BackendError:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    label = f"partition '{partition}'" if partition else "the cgroup root"
    return BackendError(f"{label}: {what} {path} failed: {code} ({exc.strerror})")


def read_text(path: Path, partition: str = "") -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise _err(partition, path, "reading", exc) from exc


def read_int(path: Path, partition: str = "") -> int:
    return int(read_text(path, partition).split()[0])


def try_read_int(path: Path) -> int | None:
    """An optional figure: ``None`` when the file is absent or unreadable."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_keyed(path: Path) -> dict[str, int]:
    """A ``key value`` per line file (``memory.events``, ``cpu.stat``); ``{}`` if absent."""
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    with contextlib.suppress(ValueError):
                        out[parts[0]] = int(parts[1])
    except OSError:
        pass
    return out


def write_text(path: Path, value: str, partition: str = "") -> None:
    """Write one value to a control file. No ``O_CREAT``: a missing control file is an
    error naming the file (it means the controller is not enabled there), never a stray
    regular file. ``O_TRUNC`` is what a shell redirection does and cgroupfs accepts it; it
    makes the same code correct on a tmpfs laid out like cgroupfs."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as exc:
        raise _err(partition, path, f"opening {value!r} for", exc) from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise _err(partition, path, f"writing {value!r} to", exc) from exc
    finally:
        os.close(fd)


def read_procs(directory: Path) -> list[int]:
    """The processes directly in one cgroup (``[]`` if it vanished meanwhile)."""
    try:
        with open(directory / "cgroup.procs") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        if exc.errno == errno.ENODEV:  # removed while open
            return []
        raise


def subtree_dirs(top: Path) -> list[Path]:
    """``top`` and every cgroup directory below it, deepest first (for rmdir)."""
    if not top.is_dir():
        return []
    out = [Path(d) for d, _, _ in os.walk(top, topdown=False)]
    return out


def subtree_procs(top: Path) -> list[int]:
    return sorted({pid for d in subtree_dirs(top) for pid in read_procs(d)})


# --------------------------------------------------------------------------- /proc parsing


@dataclass(frozen=True)
class Mount:
    mountpoint: Path
    root: str  # the path of the mounted cgroup within its hierarchy (not "/" in containers)
    fstype: str
    options: frozenset[str]  # mount + super options ("rw", "memory", "nsdelegate", ...)

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def cgroup_mounts(mountinfo: str | None = None) -> list[Mount]:
    """Every cgroup/cgroup2 mount of this mount namespace, from ``/proc/self/mountinfo``."""
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    out = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 6 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        opts = set(fields[5].split(",")) | set(rfields[2].split(","))
        mountpoint = fields[4].replace("\\040", " ")
        out.append(Mount(Path(mountpoint), fields[3], rfields[0], frozenset(opts)))
    return out


def own_cgroups(text: str | None = None) -> dict[str, str]:
    """Controller → cgroup path of this process (``""`` is the v2 unified entry).

    Named v1 hierarchies (``name=systemd``) keep their ``name=`` key."""
    if text is None:
        with open("/proc/self/cgroup") as f:
            text = f.read()
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            out[""] = path
        for c in controllers.split(","):
            if c:
                out[c] = path
    return out


def relative_to_mount(own: str, mount: Mount) -> str:
    """Where ``own`` (a /proc/self/cgroup path) lies inside ``mount`` (``/``-rooted)."""
    if mount.root not in ("/", "") and (own == mount.root or own.startswith(mount.root + "/")):
        own = own[len(mount.root) :] or "/"
    return own


def root_dir(base: Path, own: str, cgroup_root: str | None, instance: str | None) -> Path:
    """Our root directory in one hierarchy.

    ``cgroup_root`` ``None`` → ``<own cgroup>/supervisord-qnx``; a relative name → under the
    own cgroup; an absolute path → from the hierarchy's mount root. ``instance`` suffixes
    the last component (``supervisord-qnx.test-1a2b``) so daemons and tests never share a
    root. Refuses a root that is, or contains, the daemon's own cgroup: ``reap_leftovers``
    would kill the daemon itself.
    """
    name = (cgroup_root or DEFAULT_ROOT).rstrip("/")
    if instance:
        name = f"{name}.{instance}"
    rel = name if name.startswith("/") else f"{own.rstrip('/')}/{name}"
    rel = "/" + "/".join(p for p in rel.split("/") if p)
    if any(p in (".", "..") for p in rel.split("/")):
        raise BackendUnavailable(f"cgroup_root {cgroup_root!r} must not contain '.' or '..'")
    own_norm = own.rstrip("/") or "/"
    if rel == "/" or own_norm == rel or own_norm.startswith(rel + "/"):
        raise BackendUnavailable(
            f"cgroup_root {cgroup_root!r} resolves to {rel}, which holds the daemon's own "
            f"cgroup {own}: reaping leftovers there would kill the daemon; choose a "
            f"dedicated directory"
        )
    return base / rel.lstrip("/")


# --------------------------------------------------------------------------- spawning

# The exec shim: write our own pid into each cgroup.procs given, then exec the worker.
SHIM = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 126; shift; n=$((n-1)); done; exec "$@"'  # noqa: E501


def quota_for(cpu_max: float | None, ncpu: int, period: int = CFS_PERIOD_US) -> int | None:
    """CFS quota (µs per ``period``) for a ceiling in percent of the whole machine."""
    if cpu_max is None:
        return None
    return max(1000, round(cpu_max / 100 * ncpu * period))


def preexec_attach(procs: list[str]) -> Callable[[], None]:
    """The measured alternative to the shim (bench/bench_spawn.py): attach in the child."""
    data = str  # bound early: nothing is looked up in the child

    def attach() -> None:
        pid = data(os.getpid()).encode()
        for p in procs:
            fd = os.open(p, os.O_WRONLY)
            os.write(fd, pid)
            os.close(fd)

    return attach


def spawn_shim(
    argv: list[str], procs: list[str], kwargs: dict[str, Any]
) -> subprocess.Popen[bytes]:
    """Exec ``/bin/sh`` to attach itself, then ``exec`` the worker (same pid).

    Used by both cgroup backends: it keeps the spawn on the vfork path (no preexec_fn).
    ``procs`` are ``cgroup.procs`` files (the shell writes its pid) or, cgroup v1, the
    ``tasks`` files of the leaf (it writes ``0``: see ``JOIN_SHIM``)."""
    env = kwargs.get("env")
    path_var = env.get("PATH") if isinstance(env, dict) else None
    # The shell would turn a missing program into exit 127; raise as Popen would.
    if "/" not in argv[0] and shutil.which(argv[0], path=path_var or os.defpath) is None:
        raise FileNotFoundError(2, f"No such file or directory: {argv[0]!r}")
    if not procs:
        return subprocess.Popen(argv, **kwargs)
    # The shim's stdin is the write end of a pipe until it has joined its last cgroup:
    # it then takes /dev/null (what a worker's stdin always is), and the read end here
    # sees EOF. So "spawned" means "inside its partition" to everyone who looks, learnt
    # from the kernel at once instead of by polling cgroup.procs.
    joined, joining = os.pipe()
    try:
        full = ["/bin/sh", "-c", JOIN_SHIM, "sh", str(len(procs)), *procs, *argv]
        proc = subprocess.Popen(full, **{**kwargs, "stdin": joining})
    except BaseException:
        os.close(joined)
        raise
    finally:
        os.close(joining)
    try:
        # A shim that could not attach exits 126: EOF as well. The timeout is for a
        # shell stuck in a cgroup write (the kernel's cgroup mutex held elsewhere).
        # poll, not select: a daemon with 1000 workers has descriptors past FD_SETSIZE.
        # The process exists by now: nothing here may lose it to an exception.
        waiter = select.poll()
        waiter.register(joined, select.POLLIN)
        with contextlib.suppress(OSError):
            waiter.poll(JOIN_TIMEOUT * 1000)
    finally:
        os.close(joined)
    return proc


# Writes each file given (its pid into a ``cgroup.procs``; ``0``, i.e. "this thread",
# into a v1 ``tasks`` file), then swaps its stdin (``spawn_shim``'s pipe) for /dev/null
# and execs the worker. Why ``0`` into ``tasks`` (cgroup v1): moving a pid takes the
# kernel's global cgroup_threadgroup_rwsem for writing, which waits for an RCU grace
# period when the lock was idle (10-15 ms for the first of a spawn's moves on the loaded
# CI machine, bench/bench_supervisor.py); the kernel moves the *calling thread* ("0",
# and not through cgroup.procs) without that lock. The shell has one thread, so moving
# it moves the whole process, as cgroup.procs would.
JOIN_SHIM = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do case "$1" in */tasks) v=0;; *) v=$$;; esac; '
    'echo $v > "$1" || exit 126; shift; n=$((n-1)); done; exec <>/dev/null; exec "$@"'
)
# How long a spawn waits for its shim to join its leaf before it returns anyway.
JOIN_TIMEOUT = 2.0


# --------------------------------------------------------------------------- killing


def kill_subtree(
    dirs: Callable[[], Iterable[Path]],
    what: str,
    timeout: float = 5.0,
    spare: Collection[int] = (),
) -> None:
    """SIGKILL every process in the given cgroup directories, except ``spare``, until
    they read empty (but for ``spare``)."""
    me = os.getpid()
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        pids = {pid for d in dirs() for pid in read_procs(d)}
        pids.discard(me)  # never: a daemon thread can sit in a leaf mid-spawn
        pids.difference_update(spare)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise BackendError(
                f"partition '{what}': processes {sorted(pids)} still in cgroup.procs "
                f"{timeout:g}s after SIGKILL"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def rmdir_retry(path: Path, partition: str, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise _err(partition, path, "removing", exc) from exc
            time.sleep(0.005)


def write_all(writes: Sequence[tuple[Path, str]], partition: str) -> None:
    """Write each ``(file, value)`` in order, or none: if one write fails, the files
    already written get their previous values back (read just before writing), and the
    error says the partition keeps its previous figures."""
    done: list[tuple[Path, str]] = []
    try:
        for path, value in writes:
            previous = read_text(path, partition).strip()
            write_text(path, value, partition)
            done.append((path, previous))
    except BackendError as exc:
        undo_failures = []
        for path, previous in reversed(done):
            try:
                write_text(path, previous, partition)
            except BackendError as undo:
                undo_failures.append(str(undo))
        cause = exc.__cause__
        hint = ""
        if isinstance(cause, OSError) and cause.errno == errno.EBUSY:
            hint = (
                " (the partition uses more memory than that and the kernel could not "
                "reclaim it; free memory in the tenant or restart it first)"
            )
        kept = (
            "; putting back the previous figures failed too: " + "; ".join(undo_failures)
            if undo_failures
            else "; the partition keeps its previous figures"
        )
        raise BackendError(f"{exc}{hint}{kept}") from cause


def mkdir(path: Path, partition: str) -> bool:
    """Create one cgroup directory; ``False`` if it already existed."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise _err(partition, path, "creating", exc) from exc


# --------------------------------------------------------------------------- notification


Key = tuple[str, str, str | None]  # (kind "oom" | "pressure", partition path, leaf)


class Notifier:
    """One epoll set of kernel notification fds, each mapped to a key (see module doc)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._by_fd: dict[int, tuple[Key, bool]] = {}  # fd → (key, is_eventfd)
        self._by_key: dict[Key, list[int]] = {}  # fds to close with the key
        self.polled: set[Key] = set()  # keys without a pollable fd: sampled

    def fileno(self) -> int:
        return self._epoll.fileno()

    def add(self, key: Key, fd: int, *, eventfd: bool, extra_fds: Iterable[int] = ()) -> None:
        """Watch ``fd`` for ``key``; ``extra_fds`` are closed with it. Takes ownership."""
        mask = select.EPOLLIN if eventfd else select.EPOLLPRI
        with self._lock:
            try:
                self._epoll.register(fd, mask)
            except OSError as exc:
                if exc.errno != errno.EPERM:  # EPERM: a regular file (tests' tmpfs)
                    raise
                os.close(fd)
                for extra in extra_fds:
                    os.close(extra)
                self.polled.add(key)
                return
            self._by_fd[fd] = (key, eventfd)
            self._by_key.setdefault(key, []).extend([fd, *extra_fds])

    def remove(self, match: Callable[[Key], bool]) -> None:
        with self._lock:
            for key in [k for k in self._by_key if match(k)]:
                for fd in self._by_key.pop(key):
                    self._by_fd.pop(fd, None)
                    os.close(fd)  # closing drops it from the epoll set
            self.polled -= {k for k in self.polled if match(k)}

    def ready(self) -> list[Key]:
        """Keys whose fds fired since the last call; resets each fd's readiness."""
        keys = []
        for fd, _ in self._epoll.poll(0):
            with self._lock:
                entry = self._by_fd.get(fd)
                if entry is None:
                    continue
                key, is_eventfd = entry
                try:
                    if is_eventfd:
                        os.eventfd_read(fd)
                    else:
                        os.pread(fd, 4096, 0)  # re-reading clears POLLPRI (kernfs)
                except (BlockingIOError, OSError):
                    pass
            keys.append(key)
        return keys

    def keys(self) -> list[Key]:
        with self._lock:
            return [*self._by_key, *self.polled]

    def close(self) -> None:
        self.remove(lambda _k: True)
        self._epoll.close()


# --------------------------------------------------------------------------- base class


def under(path: str, top: str) -> bool:
    """Is partition ``path`` equal to or below ``top`` (``""`` is the root)?"""
    return not top or path == top or path.startswith(top + "/")


class CgroupBackendBase(Backend):
    """Bookkeeping both cgroup backends share: leaves, OOM baselines, the watch loop.

    Subclasses provide the directory layout and the per-version kernel files.
    """

    def __init__(self, *, sample_interval: float = 0.25) -> None:
        self._lock = threading.RLock()
        self._notifier = Notifier()
        self._partitions: dict[str, Partition] = {}
        self._leaves: set[tuple[str, str]] = set()
        self._oom_base: dict[tuple[str, str | None], int] = {}  # for leaf_exit_reason
        self._oom_seen: dict[tuple[str, str | None], int] = {}  # for watch events
        self._pressure_state: dict[str, int] = {}  # last pressure counter / flag per path
        self._pressure_events: dict[str, int] = {}
        # OOM kills of leaves already removed (v1 counts are local to a memcg and vanish
        # with it; stats must stay cumulative).
        self._retired_ooms: dict[str, int] = {}
        self._sample_interval = sample_interval
        self._root_ready = False

    # -- subclass hooks
    def _ensure_root(self) -> None:
        raise NotImplementedError

    def _make_leaf_dirs(self, path: str, leaf: str) -> None:
        raise NotImplementedError

    def _register(self, path: str, leaf: str | None) -> None:
        """Register OOM (and, for partitions, pressure) notification for one cgroup."""
        raise NotImplementedError

    def _oom_count(self, path: str, leaf: str | None) -> int:
        """Kernel OOM kills of processes directly in this cgroup (a leaf, or a partition
        for processes attached to it)."""
        raise NotImplementedError

    def _pressure_check(self, path: str) -> dict[str, object] | None:
        """Detail for a MEMORY_PRESSURE event if pressure rose since last check, else None."""
        raise NotImplementedError

    def _remove_dirs(self, path: str, leaf: str | None) -> list[str]:
        raise NotImplementedError

    def _limit_writes(self, old: Partition, new: Partition) -> list[tuple[Path, str]]:
        """The control-file writes that take a partition from ``old``'s figures to
        ``new``'s, in a safe order."""
        raise NotImplementedError

    def _before_limits(self, old: Partition, new: Partition) -> None:  # noqa: ARG002
        """A last check before the writes (raise ``BackendError`` to refuse)."""
        return None

    def _rearm_pressure(self, path: str) -> None:
        """The pressure threshold changed: watch the partition's new one."""
        raise NotImplementedError

    # -- shared
    def update_limits(self, partition: Partition) -> None:
        p = partition.path
        with self._lock:
            old = self._partitions.get(p) if p else None
        if old is None:
            raise BackendError(f"partition '{p}' was not created by this backend")
        self._before_limits(old, partition)
        # Outside the lock: lowering a memory limit makes the kernel reclaim first,
        # which can take a while, and nobody else must wait for that.
        write_all(self._limit_writes(old, partition), p)
        with self._lock:
            self._partitions[p] = partition
            if old.pressure_threshold != partition.pressure_threshold:
                self._rearm_pressure(p)

    def adopt(self, tree: PartitionTree) -> None:
        with self._lock:
            for p in list(self._partitions):
                if p and p in tree:
                    self._partitions[p] = tree[p]

    def ensure_leaf(self, path: str, leaf: str) -> None:
        """Create the worker leaf if needed and take its OOM baseline (spawn calls this)."""
        if path not in self._partitions:
            raise BackendError(f"partition '{path}' was not created by this backend")
        with self._lock:
            fresh = (path, leaf) not in self._leaves
            if fresh:
                self._make_leaf_dirs(path, leaf)
                self._leaves.add((path, leaf))
                self._register(path, leaf)
            self._oom_base[(path, leaf)] = self._oom_count(path, leaf)

    def leaf_members(self, path: str, leaf: str) -> list[int] | None:
        return sorted({pid for d in self._cgroup_dirs(path, leaf) for pid in read_procs(d)})

    def adopt_worker(self, path: str, leaf: str, pid: int) -> None:  # noqa: ARG002
        # The leaf exists (spared by reap_leftovers_keeping): its bookkeeping and OOM
        # baseline start now; an OOM kill while no daemon ran is not seen (docs/state.md).
        self.ensure_leaf(path, leaf)

    def leaf_exit_reason(self, path: str, leaf: str) -> str | None:
        with self._lock:
            if (path, leaf) not in self._leaves:
                return None
            now = self._oom_count(path, leaf)
            before = self._oom_base.get((path, leaf), now)
            self._oom_base[(path, leaf)] = now
        return "oom-killed" if now > before else None

    def leaf_after_exit_now(self, path: str, leaf: str) -> LeafExit | None:
        """On the event loop: the OOM counter (one small file) and the leaf's
        ``cgroup.procs`` are kernel memory, read without sleeping on I/O (the watch loop
        reads the same counters there); only the bookkeeping lock could make it wait, so
        when another thread holds it the caller takes the thread hop instead. Measured
        here: 0.05-0.1 ms per exit (docs/benchmarks.md)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            reason = self.leaf_exit_reason(path, leaf)
        finally:
            self._lock.release()
        me = os.getpid()
        return LeafExit(reason, tuple(p for p in self.pids(path, leaf) if p != me))

    def release_leaf(self, path: str, leaf: str) -> None:
        with self._lock:
            if (path, leaf) not in self._leaves:
                return
            self._notifier.remove(lambda k: k[1] == path and k[2] == leaf)
            try:
                gone = self._oom_count(path, leaf)
            except BackendError:
                gone = 0
            self._retired_ooms[path] = self._retired_ooms.get(path, 0) + gone
            self._leaves.discard((path, leaf))
            self._oom_base.pop((path, leaf), None)
            self._oom_seen.pop((path, leaf), None)
        # Outside the lock: a process in uninterruptible sleep can make the kills and the
        # rmdir wait, and nothing else (status's stats, another worker's spawn) may wait
        # behind it.
        self._remove_dirs(path, leaf)

    def recreate(self, chain: Sequence[Partition]) -> bool:
        missing = next((i for i, n in enumerate(chain) if not self._present(n.path)), None)
        if missing is not None:
            with self._lock:
                # Its notification fds and OOM baselines belong to the directories that
                # are gone; start the vanished subtree's bookkeeping afresh.
                self._forget(chain[missing].path)
            for node in chain[missing:]:
                self.create(node)
            return True
        # Only worker leaves went: forget them, and the next spawn makes them again.
        paths = {n.path for n in chain}
        with self._lock:
            gone = {lf for lf in self._leaves if lf[0] in paths and not self._present(*lf)}
            self._notifier.remove(lambda k: (k[1], k[2]) in gone)
            for lf in gone:
                self._leaves.discard(lf)
                self._oom_base.pop(lf, None)
                self._oom_seen.pop(lf, None)
        return bool(gone)

    #: The files of a delegated directory its new owner may write: the directory itself
    #: (new sub-cgroups), membership, and (v2) which controllers its children get.
    DELEGATED_FILES = ("cgroup.procs", "tasks", "cgroup.subtree_control", "cgroup.threads")

    def delegate(self, path: str, uid: int, gid: int) -> None:
        for d in self._cgroup_dirs(path):
            try:
                os.chown(d, uid, gid, follow_symlinks=False)
                for name in self.DELEGATED_FILES:
                    with contextlib.suppress(FileNotFoundError):
                        os.chown(d / name, uid, gid, follow_symlinks=False)
            except OSError as exc:
                raise _err(path, d, "delegating", exc) from exc

    def _present(self, path: str, leaf: str | None = None) -> bool:
        return all(d.is_dir() for d in self._cgroup_dirs(path, leaf))

    def _cgroup_dirs(self, path: str, leaf: str | None = None) -> list[Path]:
        """The directories of a partition (or of one worker leaf), one per hierarchy."""
        raise NotImplementedError

    def _forget(self, top: str) -> None:
        """Drop bookkeeping (and close notification fds) for a subtree before rmdir."""
        self._notifier.remove(lambda k: under(k[1], top))
        for p in [p for p in self._partitions if under(p, top)]:
            del self._partitions[p]
            self._pressure_state.pop(p, None)
            self._retired_ooms.pop(p, None)
        self._leaves = {lf for lf in self._leaves if not under(lf[0], top)}
        for d in (self._oom_base, self._oom_seen):
            for k in [k for k in d if under(k[0], top)]:
                del d[k]

    def _note_registered(self, path: str, leaf: str | None) -> None:
        self._oom_seen[(path, leaf)] = self._oom_count(path, leaf)

    def _check(self, key: Key) -> list[BackendEvent]:
        kind, path, leaf = key
        with self._lock:
            if kind == "oom":
                if leaf is not None and (path, leaf) not in self._leaves:
                    return []
                if leaf is None and path not in self._partitions:
                    return []
                try:
                    now = self._oom_count(path, leaf)
                except BackendError:
                    return []  # removed meanwhile
                before = self._oom_seen.get((path, leaf), now)
                self._oom_seen[(path, leaf)] = now
                if now > before:
                    return [
                        BackendEvent(
                            EventKind.OOM_KILL,
                            path,
                            leaf,
                            {"oom_kills": now, "new": now - before},
                        )
                    ]
                return []
            if path not in self._partitions:
                return []
            try:
                detail = self._pressure_check(path)
            except BackendError:
                return []
            if detail is None:
                return []
            self._pressure_events[path] = self._pressure_events.get(path, 0) + 1
            return [BackendEvent(EventKind.MEMORY_PRESSURE, path, None, detail)]

    async def watch(self, tree: PartitionTree, emit: EventSink) -> None:
        # The tree is what the daemon created through ``create``; our registrations were
        # made there and in ``spawn``, so the tree itself is not needed here.
        del tree
        fd = self._notifier.fileno()
        # v1 signals "this memcg is OOM" *before* the killer picks and counts a victim, so
        # the first read after a wake-up can still see the old oom_kill; re-read a few
        # times shortly after (the checks are idempotent, so a late or double read is safe).
        rechecks: dict[Key, list[float]] = {}
        while True:
            now = trio.current_time()
            deadline = float("inf")
            if self._notifier.polled:
                deadline = now + self._sample_interval
            if rechecks:
                deadline = min(deadline, min(t[0] for t in rechecks.values()))
            keys: list[Key] = []
            with trio.move_on_at(deadline):
                await trio.lowlevel.wait_readable(fd)
            keys = self._notifier.ready()
            now = trio.current_time()
            for key in keys:
                if key[0] == "oom":
                    rechecks[key] = [now + d for d in OOM_RECHECK_DELAYS]
            for key, times in list(rechecks.items()):
                if times[0] <= now:
                    keys.append(key)
                    times.pop(0)
                    if not times:
                        del rechecks[key]
            keys += sorted(self._notifier.polled, key=str)
            for key in dict.fromkeys(keys):
                for event in self._check(key):
                    emit(event)

    def close(self) -> None:
        self._notifier.close()
