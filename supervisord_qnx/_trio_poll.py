"""A poll(2) I/O back end for trio, for platforms that have neither epoll nor kqueue.

trio ships three I/O managers -- epoll (Linux), kqueue (BSD, macOS) and IOCP
(Windows) -- picks one when ``trio._core._run`` is imported and raises
``NotImplementedError("unsupported platform")`` when none applies
(python-trio/trio#1437).  QNX Neutrino is such a platform: its ``select``
module offers ``select()`` and ``poll()`` only.  This module supplies the
missing fourth manager and the code that smuggles it into trio.

poll() or select()?
-------------------

Both are "stateless" interfaces: every wait hands the kernel the complete set
of interesting descriptors and the kernel (on Neutrino: libc, which arms each
descriptor's resource manager through ionotify() and then blocks for the
notification pulse) walks all of them.  That O(n)-per-wait cost is the price of
not having an epoll/kqueue-style readiness object, and it is the same for both
calls.  What differs is everything around that scan:

* **Descriptor numbers, not counts, are limited with select().**  An
  ``fd_set`` is a bitmap of ``FD_SETSIZE`` bits fixed when libc and CPython
  were compiled; CPython refuses any descriptor ``>= FD_SETSIZE``.  A
  supervisor holds stdout/stderr pipes per child, control sockets and log
  files, so descriptor numbers climb with the size of the tree, and a single
  high-numbered socket would become impossible to wait on no matter how few
  descriptors the loop is actually watching.  poll() takes
  an array of ``struct pollfd`` and has no such ceiling.

* **Per-call rebuild cost.**  ``select.select`` converts three Python lists
  into bitmaps on every call and back again afterwards.  ``select.poll``
  objects keep the registrations in a dict and only rebuild their
  ``pollfd`` array when a registration changed since the previous call, so a
  loop whose interest set is stable pays only the kernel's scan.  We lean on
  that: the manager re-registers a descriptor only when the mask it wants
  actually changes.

* **A stale descriptor.**  If a descriptor in the set was closed behind our
  back, select() fails *as a whole* with EBADF and does not say which
  descriptor was bad; the event loop would have to probe them one by one.
  poll() reports ``POLLNVAL`` in that one entry's ``revents`` and carries on
  with the others, so the damage stays with the task that owned the bad
  descriptor: it is woken with ``OSError(EBADF)`` -- the error epoll would
  have raised when the descriptor was registered -- instead of hanging.
  (epoll silently forgets a closed descriptor, leaving its waiter asleep
  forever; here we do strictly better.)

* **POLLHUP/POLLERR are reported whether or not they were asked for**, just
  like EPOLLHUP/EPOLLERR, which lets us keep epoll's wake-up rule: any
  condition other than plain writability wakes the reader, any condition
  other than plain readability wakes the writer.  Each woken task then
  learns the details from its own read()/write()/recv().

So poll() it is.  poll() is level-triggered and has no EPOLLONESHOT, so a
descriptor must leave the interest set as soon as its waiter has been woken,
otherwise the next wait would return immediately for data the woken task has
not consumed yet and the loop would spin; ``_sync`` below maintains that
invariant.

Wiring it into trio
-------------------

trio's I/O managers are private API.  Everything trio needs from one is: a
no-argument constructor (``setup_runner`` calls the module global
``trio._core._run.TheIOManager``), ``get_events(timeout)`` /
``process_events(events)`` driven by the run loop, ``force_wakeup()``,
``statistics()`` and ``close()``, plus the methods that the generated
``trio.lowlevel.wait_readable`` & co. look up dynamically as
``GLOBAL_RUN_CONTEXT.runner.io_manager.<name>``.  Because both lookups happen
at call time, replacing ``TheIOManager`` before the first ``trio.run`` is all
that is needed on Linux.

Where trio cannot be imported at all, see ``_import_trio_without_native_backend``
for how the import is made to succeed.  Since this relies on internals, we
check the installed trio version against the versions we verified and the
internal attributes we rely on, and refuse loudly otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import inspect
import math
import os
import select
import socket
import sys
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, NoReturn, Protocol

import outcome  # a trio dependency that does not import trio itself

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio.lowlevel import Abort, RaiseCancelT, Task

__all__ = [
    "ENV_VAR",
    "VERIFIED_TRIO_VERSIONS",
    "PollIOManager",
    "PollStatistics",
    "install",
    "is_installed",
    "native_backend_available",
    "select_backend",
]

#: Environment switch read by :func:`supervisord_qnx.iomanager.select_io_backend`.
ENV_VAR: Final = "SUPERVISORD_QNX_IO"

#: trio releases whose private I/O-manager contract this module was checked
#: against (source read and the test-suite run against each release).
VERIFIED_TRIO_VERSIONS: Final = frozenset(
    {
        "0.27.0",
        "0.28.0",
        "0.29.0",
        "0.30.0",
        "0.31.0",
        "0.32.0",
        "0.33.0",
        "0.34.0",
        "0.35.0",
    }
)

# trio clamps run-loop timeouts to 24 h; we clamp again so that a direct
# caller passing ``inf`` cannot overflow poll()'s int milliseconds.
_MAX_TIMEOUT_S: Final = 24 * 60 * 60

# Interest bits we ask for.  POLLPRI (out-of-band data) is deliberately not
# requested: trio's contract is plain readability/writability.
_READ: Final = select.POLLIN
_WRITE: Final = select.POLLOUT


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def _as_fd(fd: int | _HasFileno) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


class _FdWaiters:
    """At most one reading and one writing task per descriptor, as in trio."""

    __slots__ = ("mask", "reader", "writer")

    def __init__(self) -> None:
        self.reader: Task | None = None
        self.writer: Task | None = None
        # The mask currently registered with the poll object (0 = not registered).
        self.mask = 0

    def wanted(self) -> int:
        return (_READ if self.reader is not None else 0) | (
            _WRITE if self.writer is not None else 0
        )


@dataclass(frozen=True, slots=True)
class PollStatistics:
    """What ``trio.lowlevel.current_statistics().io_statistics`` returns."""

    tasks_waiting_read: int
    tasks_waiting_write: int
    registered_fds: int
    backend: Literal["poll"] = "poll"


class PollIOManager:
    """trio I/O manager built on ``select.poll()``.

    Instantiated by trio itself (``setup_runner``), once per ``trio.run``.
    """

    #: The trio package install() patched.  A manager must talk to the trio
    #: that constructs it rather than to whatever ``sys.modules["trio"]`` is
    #: by then: trio can be re-imported in-process (its own test-suite does),
    #: and the new copy has its own run context.
    _trio_package: ClassVar[Any] = None

    def __init__(self) -> None:
        # trio is necessarily importable by now: it is trio that constructs us.
        # Importing here rather than at module level keeps this module
        # importable *before* trio, which install() depends on.
        import trio

        if self._trio_package is not None:
            trio = self._trio_package
        self._trio = trio
        self._ll = trio.lowlevel
        self._poller = select.poll()
        self._waiters: dict[int, _FdWaiters] = {}
        # A socketpair rather than os.pipe(): trio's own entry queue already
        # needs AF_UNIX socketpairs, whereas on QNX pipe() needs the separate
        # `pipe` resource manager to be running -- no new dependency this way.
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        self._wake_fd = self._wake_recv.fileno()
        self._poller.register(self._wake_fd, _READ)

    # -- run-loop side -----------------------------------------------------

    def statistics(self) -> PollStatistics:
        readers = sum(1 for w in self._waiters.values() if w.reader is not None)
        writers = sum(1 for w in self._waiters.values() if w.writer is not None)
        return PollStatistics(
            tasks_waiting_read=readers,
            tasks_waiting_write=writers,
            registered_fds=sum(1 for w in self._waiters.values() if w.mask),
        )

    def close(self) -> None:
        # A poll object owns no kernel resource; only the wakeup pair does.
        self._wake_recv.close()
        self._wake_send.close()

    def force_wakeup(self) -> None:
        # Called from other threads and from signal context: a single
        # non-blocking send is safe in both.  A full buffer means a wakeup is
        # already pending, which is all we need.
        with contextlib.suppress(BlockingIOError):
            self._wake_send.send(b"\0")

    def get_events(self, timeout: float) -> list[tuple[int, int]]:
        # trio hands us seconds; poll(2) takes whole milliseconds.  Round *up*:
        # truncating 0.4 ms to 0 would return at once, the run loop would find
        # its deadline not yet expired and poll again -- a busy loop until the
        # deadline.  Rounding up costs at most 1 ms of lateness, which trio's
        # timeouts already tolerate (the epoll manager also rounds up).
        timeout = min(max(timeout, 0.0), _MAX_TIMEOUT_S)
        # EINTR is retried inside CPython with the remaining timeout (PEP 475).
        return self._poller.poll(math.ceil(timeout * 1000))

    def process_events(self, events: list[tuple[int, int]]) -> None:
        for fd, revents in events:
            if fd == self._wake_fd:
                self._drain_wakeups()
                continue
            waiters = self._waiters.get(fd)
            if waiters is None:
                # Nobody is interested any more (can only happen if the
                # interest set changed while a guest-mode poll was running);
                # make sure it cannot keep firing.
                with contextlib.suppress(KeyError):
                    self._poller.unregister(fd)
                continue
            if revents & select.POLLNVAL:
                # The descriptor was closed without notify_closing().  Report
                # it the way epoll would have at registration time.
                self._fail_all(fd, waiters, lambda: OSError(errno.EBADF, os.strerror(errno.EBADF)))
                continue
            # Same rule as trio's epoll manager: anything but pure POLLOUT
            # (data, EOF/HUP, error) concerns the reader; anything but pure
            # POLLIN concerns the writer.  The kernel only reports bits we
            # asked for plus HUP/ERR/NVAL, so every report wakes someone or
            # drops the interest, and an unexpected bit cannot make us spin.
            if revents & ~_WRITE and waiters.reader is not None:
                self._ll.reschedule(waiters.reader)
                waiters.reader = None
            if revents & ~_READ and waiters.writer is not None:
                self._ll.reschedule(waiters.writer)
                waiters.writer = None
            self._sync(fd, waiters)

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_recv.recv(4096):
                pass

    # -- registration bookkeeping -----------------------------------------

    def _sync(self, fd: int, waiters: _FdWaiters) -> None:
        """Make the poll registration of *fd* match its remaining waiters.

        poll() is level-triggered, so a descriptor must stop being watched
        for a direction as soon as nobody waits for it (see module docstring).
        Registering is only done on change: every change makes CPython
        rebuild its whole pollfd array on the next poll().
        """
        wanted = waiters.wanted()
        if wanted == waiters.mask:
            if not wanted and self._waiters.get(fd) is waiters:
                del self._waiters[fd]
            return
        if wanted:
            # register() on an already-registered fd replaces its mask.
            self._poller.register(fd, wanted)
            waiters.mask = wanted
            return
        with contextlib.suppress(KeyError):
            self._poller.unregister(fd)
        waiters.mask = 0
        if self._waiters.get(fd) is waiters:
            del self._waiters[fd]

    def _fail_all(
        self, fd: int, waiters: _FdWaiters, make_exc: Callable[[], BaseException]
    ) -> None:
        if self._waiters.get(fd) is waiters:
            del self._waiters[fd]
        if waiters.mask:
            with contextlib.suppress(KeyError):
                self._poller.unregister(fd)
            waiters.mask = 0
        for task in (waiters.reader, waiters.writer):
            if task is not None:
                # One exception object per task: they get tracebacks attached
                # independently.
                self._ll.reschedule(task, outcome.Error(make_exc()))
        waiters.reader = waiters.writer = None

    async def _wait(self, fd: int | _HasFileno, *, readable: bool) -> None:
        fd = _as_fd(fd)
        waiters = self._waiters.get(fd)
        if waiters is None:
            waiters = self._waiters[fd] = _FdWaiters()
        if (waiters.reader if readable else waiters.writer) is not None:
            direction = "reading from" if readable else "writing to"
            raise self._trio.BusyResourceError(f"another task is already {direction} this fd")
        task = self._ll.current_task()
        if readable:
            waiters.reader = task
        else:
            waiters.writer = task
        try:
            # Can only fail for a descriptor poll() rejects outright
            # (negative, too large); leave no trace of the attempt.
            self._sync(fd, waiters)
        except BaseException:
            self._forget(fd, waiters, readable=readable)
            raise

        def abort(_: RaiseCancelT) -> Abort:
            self._forget(fd, waiters, readable=readable)
            succeeded: Abort = self._ll.Abort.SUCCEEDED
            return succeeded

        await self._ll.wait_task_rescheduled(abort)

    def _forget(self, fd: int, waiters: _FdWaiters, *, readable: bool) -> None:
        if readable:
            waiters.reader = None
        else:
            waiters.writer = None
        if self._waiters.get(fd) is waiters:
            self._sync(fd, waiters)

    # -- what trio.lowlevel.* dispatches to ----------------------------------

    async def wait_readable(self, fd: int | _HasFileno) -> None:
        await self._wait(fd, readable=True)

    async def wait_writable(self, fd: int | _HasFileno) -> None:
        await self._wait(fd, readable=False)

    def notify_closing(self, fd: int | _HasFileno) -> None:
        fd = _as_fd(fd)
        waiters = self._waiters.get(fd)
        if waiters is None:
            return
        trio = self._trio
        self._fail_all(fd, waiters, lambda: trio.ClosedResourceError("another task closed this fd"))

    # Where trio had to be imported through its kqueue code path (see
    # _import_trio_without_native_backend), trio.lowlevel also exports
    # current_kqueue/monitor_kevent/wait_kevent, which dispatch here.  Without
    # these the generated wrappers would turn the AttributeError into a
    # misleading "must be called from async context".
    def current_kqueue(self) -> NoReturn:
        _no_kqueue()

    def monitor_kevent(self, ident: int, filter: int) -> NoReturn:  # noqa: ARG002
        _no_kqueue()

    async def wait_kevent(self, *_: object) -> NoReturn:  # trio's kqueue hook, refused
        _no_kqueue()


def _no_kqueue() -> NoReturn:
    raise RuntimeError("kqueue is not available: trio runs on the poll(2) back end here")


# -- installation ---------------------------------------------------------------

_installed = False


def is_installed() -> bool:
    return _installed


def native_backend_available() -> bool:
    """Whether stock trio can run here (mirrors trio's own import-time choice)."""
    return (
        sys.platform in ("win32", "linux", "android")
        or hasattr(select, "epoll")
        or hasattr(select, "kqueue")
    )


def select_backend(requested: str) -> Literal["poll", "native"]:
    """Apply the ``SUPERVISORD_QNX_IO`` policy; see ``iomanager.select_io_backend``."""
    choice = requested.strip().lower() or "auto"
    if choice not in ("auto", "poll", "native"):
        raise RuntimeError(f"{ENV_VAR}={requested!r}: expected 'poll', 'native' or unset")
    if choice == "native":
        if _installed:
            raise RuntimeError(
                f"{ENV_VAR}=native, but the poll back end is already installed in this process"
            )
        if not native_backend_available():
            raise RuntimeError(
                f"{ENV_VAR}=native, but this platform ({sys.platform}) has neither epoll nor "
                "kqueue, so stock trio cannot run here; unset it to use the poll back end"
            )
        return "native"
    if choice == "auto" and not _installed and native_backend_available():
        return "native"
    install()
    return "poll"


def install() -> None:
    """Make every subsequent ``trio.run`` in this process use :class:`PollIOManager`.

    Call before anything imports trio (mandatory where trio has no native
    back end, since ``import trio`` fails there) and before the first
    ``trio.run``.  Idempotent.
    """
    global _installed
    if _installed:
        return
    if not hasattr(select, "poll"):
        raise RuntimeError(f"select.poll() is not available on {sys.platform}")
    version = _trio_version()
    if version not in VERIFIED_TRIO_VERSIONS:
        _unverified(version, "this release has not been verified")
    native = native_backend_available()
    if "trio" in sys.modules or native:
        import trio
    else:
        trio = _import_trio_without_native_backend()
    run = importlib.import_module("trio._core._run")
    _check_internals(version, trio, run)
    if hasattr(run.GLOBAL_RUN_CONTEXT, "runner"):
        # The running loop keeps its manager; swapping now would leave this
        # run on the native back end while claiming otherwise.
        raise RuntimeError("the poll back end must be installed before trio.run() is entered")
    PollIOManager._trio_package = trio  # noqa: SLF001 - our own class, set once at install
    _rebind(run, "TheIOManager", PollIOManager)
    if not native:
        _replace_kqueue_child_watcher(trio)
    _installed = True


def _rebind(module: ModuleType, name: str, value: object) -> None:
    # The one place where trio's module globals are overwritten.
    if not hasattr(module, name):
        raise RuntimeError(f"{module.__name__}.{name} is missing; cannot install the poll back end")
    setattr(module, name, value)


def _trio_version() -> str:
    # Read from the distribution metadata so that an unverified trio is
    # rejected before any of its code runs.
    try:
        return metadata.version("trio")
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            "cannot determine the installed trio version (no distribution metadata); the "
            f"poll back end is verified for trio {_verified_list()} only"
        ) from None


def _verified_list() -> str:
    return ", ".join(sorted(VERIFIED_TRIO_VERSIONS, key=lambda v: tuple(map(int, v.split(".")))))


def _unverified(version: str, what: str) -> NoReturn:
    raise RuntimeError(
        f"the poll(2) I/O back end relies on trio internals and is verified for trio "
        f"{_verified_list()} only; installed trio is {version}: {what}"
    )


# Name of the attribute we pre-seed on the `select` module; kept in a variable
# because typeshed (rightly) declares no `select.kqueue` on Linux.
_KQUEUE_ATTR: Final = "kqueue"


class _KqueuePlaceholder:
    """Stands in for ``select.kqueue`` while trio is imported, never instantiated."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "trio tried to create a kqueue although the poll back end replaced its "
            "I/O manager; this trio version is not compatible with supervisord_qnx"
        )


def _import_trio_without_native_backend() -> ModuleType:
    """Import trio on a platform where it would raise "unsupported platform".

    ``trio._core._run`` picks its manager from ``sys.platform`` and the
    attributes of ``select`` and raises when neither epoll nor kqueue exists.
    We pre-seed a placeholder ``select.kqueue`` for the duration of the import
    and remove it in a ``finally``.

    Why kqueue and not epoll: trio's import-time platform tests are not all
    made in one place.  ``trio._core`` and ``trio.lowlevel`` decide whether to
    re-export the kqueue entry points (``current_kqueue``...) from
    ``sys.platform != "linux"`` alone, so on any non-Linux platform the
    import only succeeds if ``_run`` took its kqueue branch: a fake epoll
    would fail with ImportError in ``trio._core``.  Faking kqueue walks the
    one code path trio itself takes on every non-Linux Unix; its only
    import-time use of ``select.kqueue`` is as an attrs factory that is
    never called because ``TheIOManager`` is swapped immediately afterwards.

    The one side effect to repair is child-exit detection, which trio then
    wires to kqueue's EVFILT_PROC; see ``_replace_kqueue_child_watcher``.

    Not thread-safe with respect to other threads probing ``select`` during
    the import; call it from the main thread at start-up.
    """
    placeholder = _KqueuePlaceholder
    setattr(select, _KQUEUE_ATTR, placeholder)
    try:
        return importlib.import_module("trio")
    finally:
        if getattr(select, _KQUEUE_ATTR, None) is placeholder:
            delattr(select, _KQUEUE_ATTR)


def _replace_kqueue_child_watcher(trio: ModuleType) -> None:  # noqa: ARG001 - installer hook
    """Point trio's child-exit wait at waitid(WNOWAIT) instead of kqueue.

    Only relevant without pidfds (trio uses ``wait_readable(pidfd)`` -- our
    manager -- when ``os.pidfd_open`` exists).  ``trio._subprocess`` bound
    ``wait_child_exiting`` by name at import, so the module global is what we
    replace.
    """
    subprocess_mod = importlib.import_module("trio._subprocess")
    platform_mod = importlib.import_module("trio._subprocess_platform")
    try:
        waitid_mod = importlib.import_module("trio._subprocess_platform.waitid")
        replacement = waitid_mod.wait_child_exiting
    except ImportError:
        replacement = _wait_child_exiting_by_polling
    _rebind(subprocess_mod, "wait_child_exiting", replacement)
    _rebind(platform_mod, "wait_child_exiting", replacement)


async def _wait_child_exiting_by_polling(process: _TrioProcess) -> None:
    # Last resort where neither os.waitid nor cffi exists.  Without
    # waitid(WNOWAIT) there is no way to learn "exited" without reaping;
    # Process.poll() reaps through Popen and caches the status, which is
    # exactly what trio's Process.wait() reads next.
    import trio

    delay = 0.005
    while process.poll() is None:
        await trio.sleep(delay)
        delay = min(delay * 2, 0.1)


class _TrioProcess(Protocol):
    def poll(self) -> int | None: ...


def _check_internals(version: str, trio: ModuleType, run: ModuleType) -> None:
    """Verify the private seams we patch still look the way we expect."""

    def code_names(fn: object) -> tuple[str, ...]:
        code = getattr(inspect.unwrap(fn), "__code__", None)  # type: ignore[arg-type]
        return code.co_names if code is not None else ()

    for attr in ("TheIOManager", "GLOBAL_RUN_CONTEXT", "setup_runner", "run", "unrolled_run"):
        if not hasattr(run, attr):
            _unverified(version, f"trio._core._run.{attr} is missing")
    if "TheIOManager" not in code_names(run.setup_runner):
        _unverified(version, "setup_runner() no longer instantiates the TheIOManager global")
    if "get_events" not in code_names(run.run):
        _unverified(version, "trio.run() no longer calls io_manager.get_events()")
    if "process_events" not in code_names(run.unrolled_run):
        _unverified(version, "the run loop no longer calls io_manager.process_events()")
    for name in ("wait_readable", "wait_writable", "notify_closing"):
        fn = getattr(trio.lowlevel, name, None)
        names = code_names(fn)
        if "io_manager" not in names or name not in names:
            _unverified(
                version, f"trio.lowlevel.{name} no longer dispatches to runner.io_manager.{name}"
            )
    if not native_backend_available():
        subprocess_mod = importlib.import_module("trio._subprocess")
        if not hasattr(subprocess_mod, "wait_child_exiting"):
            _unverified(version, "trio._subprocess.wait_child_exiting is missing")
