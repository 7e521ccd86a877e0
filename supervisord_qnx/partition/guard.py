"""Parity with the origin design's ``QnxMemoryPartition`` API, on top of any ``Backend``.

"The seed" below is the design note this product started from: a Rust crate for QNX
memory partitions serving a WebAssembly runtime. It offers a builder, an RAII partition
that is removed on ``Drop``, ``attach_process``/``detach_process``, a ``PartitionGuard``
that makes a partition "current" for a scope, and ``with_partition(f)`` that runs code
inside the partition. Their Python shapes here:

=====================================  ==============================================
seed                                   here
=====================================  ==============================================
``QnxMemoryPartitionBuilder``          ``PartitionBuilder().with_name(..)...build(backend)``
``QnxPartitionFlags``                  ``PartitionFlags`` (the config's flag vocabulary)
``QnxMemoryPartition`` + ``Drop``      ``ManagedPartition``; ``close()`` / ``with`` removes it
``attach_process`` / ``detach_process``  same names
``PartitionGuard::new(&p)``            ``with PartitionGuard(p):`` (a ``contextvars`` scope)
``with_partition(|| ..)``              ``p.run(fn, *args)`` (alias ``with_partition``)
=====================================  ==============================================

Two deliberate differences:

* **What "current partition" means.** On QNX a thread can switch its own partition. A Linux
  memory cgroup accounts pages to a whole process, so "this code runs in the partition"
  cannot be true for code in the daemon's own address space. The guard therefore scopes
  *spawning*: inside ``with PartitionGuard(p)``, every process started through
  ``guard.spawn`` lands in ``p`` (attached before exec). The scope is a ``ContextVar``, so
  it is per thread and per trio task, and the previous partition is restored on exit even
  when the block raises.
* **``run`` executes in a child process.** The callable and its arguments are pickled to a
  fresh ``sys.executable`` started by ``backend.spawn`` inside the partition; the result
  (or exception) is pickled back. A callable that blows the partition's memory is
  OOM-killed by the kernel and surfaces as ``PartitionMemoryExceeded`` in the caller, whose
  own memory is never touched. We do not ``fork`` the caller (``multiprocessing``'s fork
  context): forking a process that runs trio and worker threads copies locks held by other
  threads, and the child would charge the caller's whole heap to the partition.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from supervisord_qnx.exits import ExitKind, ExitReason
from supervisord_qnx.partition.backend import (
    Backend,
    BackendError,
    PartitionStats,
    SpawnRequest,
)
from supervisord_qnx.partition.controls import Flag
from supervisord_qnx.partition.tree import Partition, PartitionTree

T = TypeVar("T")


# The seed design's name for the flag vocabulary.
PartitionFlags = Flag


class PartitionConfigError(ValueError):
    """The builder's figures break an admission rule (the message lists every problem)."""


# The exit reasons that mean "killed for its memory", and who did it.
_MEMORY_KILLERS = {
    ExitKind.OOM_KILLED: "the kernel OOM killer",
    ExitKind.MEMORY_LIMIT: "the supervisor's memory accounting",
}


class PartitionMemoryExceeded(MemoryError):
    """The child running ``ManagedPartition.run`` was OOM-killed at the partition's max."""


class PartitionRunError(RuntimeError):
    """The child died without a result for another reason (signal, crash)."""


_current: contextvars.ContextVar[ManagedPartition | None] = contextvars.ContextVar(
    "supervisord_qnx_partition", default=None
)
_leaf_ids = itertools.count()


def current_partition() -> ManagedPartition | None:
    """The partition of the innermost active ``PartitionGuard`` in this context."""
    return _current.get()


class PartitionBuilder:
    """Fluent configuration of one partition (the origin design's ``QnxMemoryPartitionBuilder``)."""

    def __init__(self) -> None:
        self._name: str | None = None
        self._parent: ManagedPartition | None = None
        self._flags: set[str] = set()
        self._min = 0
        self._max: int | None = None
        self._reserved = 0
        self._budget: float | None = None
        self._cpu_max: float | None = None
        self._pids: int | None = None

    def with_name(self, name: str) -> PartitionBuilder:
        self._name = name
        return self

    def with_parent(self, parent: ManagedPartition) -> PartitionBuilder:
        self._parent = parent
        return self

    def with_flags(self, *flags: PartitionFlags | str) -> PartitionBuilder:
        self._flags.update(str(PartitionFlags(f)) for f in flags)
        return self

    def with_memory_size(self, minimum: int, maximum: int, reserved: int) -> PartitionBuilder:
        self._min, self._max, self._reserved = minimum, maximum, reserved
        return self

    def with_cpu(
        self, budget: float | None = None, maximum: float | None = None
    ) -> PartitionBuilder:
        self._budget, self._cpu_max = budget, maximum
        return self

    def with_pids(self, pids: int) -> PartitionBuilder:
        self._pids = pids
        return self

    def build(self, backend: Backend) -> ManagedPartition:
        """Admit the figures, create the partition through ``backend`` and own it."""
        if not self._name:
            raise PartitionConfigError("a partition needs a name (with_name)")
        parent = self._parent
        if parent is not None and parent.closed:
            raise PartitionConfigError(f"parent partition '{parent.path}' is already closed")
        tree = parent.tree if parent is not None else PartitionTree()
        parent_path = parent.path if parent is not None else ""
        path = f"{parent_path}/{self._name}" if parent_path else self._name
        if path in tree:
            raise PartitionConfigError(f"partition '{path}' exists already")
        node = Partition(
            path,
            flags=frozenset(self._flags),
            memory_min=self._min,
            memory_max=self._max,
            memory_reserved=self._reserved,
            cpu_budget=self._budget,
            cpu_max=self._cpu_max,
            pids_max=self._pids,
        )
        tree.add(node, parent_path)
        problems = [p.reason for p in tree.admit() if p.partition in (path, parent_path)]
        problems += [p for p in backend.check(tree) if f"'{path}'" in p]
        if problems:
            tree.remove(path)
            raise PartitionConfigError(f"partition '{path}': " + "; ".join(problems))
        try:
            backend.create(node)
        except BaseException:
            tree.remove(path)
            raise
        return ManagedPartition(backend, tree, node)


class ManagedPartition:
    """A partition this object created and will remove (RAII: ``close`` or ``with``)."""

    def __init__(self, backend: Backend, tree: PartitionTree, node: Partition) -> None:
        self.backend = backend
        self.tree = tree
        self.node = node
        self.closed = False
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        return self.node.path

    def __repr__(self) -> str:
        return f"<ManagedPartition {self.path!r} via {self.backend.name}>"

    def __enter__(self) -> ManagedPartition:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill what is left inside and remove the partition (and any child partitions)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        try:
            self.backend.destroy(self.path)
        finally:
            if self.path in self.tree:
                self.tree.remove(self.path)

    def _alive(self) -> None:
        if self.closed:
            raise BackendError(f"partition '{self.path}' is closed")

    def attach_process(self, pid: int) -> None:
        self._alive()
        self.backend.attach(self.path, pid)

    def detach_process(self, pid: int) -> None:
        self._alive()
        self.backend.detach(pid)

    def pids(self) -> list[int]:
        return self.backend.pids(self.path)

    def stats(self) -> PartitionStats:
        return self.backend.stats(self.path)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        leaf: str = "guard",
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        pass_fds: Iterable[int] = (),
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this partition (in worker leaf ``leaf``), attached before exec.

        ``stdout``/``stderr`` are file descriptors (default: inherit 1 and 2);
        ``subprocess.PIPE`` works with the cgroup backends.
        """
        self._alive()
        return self.backend.spawn(
            _request(self.path, leaf, argv, cwd, env, stdout, stderr, pass_fds)
        )

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in a child process inside this partition.

        Returns its result or re-raises its exception here. Raises
        ``PartitionMemoryExceeded`` if the kernel OOM-killed the child, and
        ``PartitionRunError`` if it died otherwise. Blocking: from trio, call it through
        ``trio.to_thread.run_sync``. ``fn`` must be picklable (a module-level function).
        """
        self._alive()
        leaf = f"run-{next(_leaf_ids)}"
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = self.spawn(
                [sys.executable, "-c", _CHILD, str(in_r), str(out_w)],
                leaf=leaf,
                stdout=2,
                stderr=err_w,
                pass_fds=(in_r, out_w),
            )
        except BaseException:
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        try:
            # Readers first, then the payload: a large payload or a chatty child cannot
            # deadlock us against full pipes.
            out: list[bytes] = []
            err: list[bytes] = []
            readers = [
                threading.Thread(target=_drain, args=(out_r, out), daemon=True),
                threading.Thread(target=_drain, args=(err_r, err), daemon=True),
            ]
            for t in readers:
                t.start()
            try:
                with os.fdopen(in_w, "wb", closefd=True) as f:
                    in_w = -1
                    pickle.dump(list(sys.path), f)
                    pickle.dump((fn, args, kwargs), f, protocol=pickle.HIGHEST_PROTOCOL)
            except BrokenPipeError:
                pass  # the child died early; its exit status says why
            returncode = proc.wait()
            for t in readers:
                t.join()
            reason = self.backend.leaf_exit_reason(self.path, leaf)
        finally:
            if in_w != -1:
                os.close(in_w)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            self.backend.release_leaf(self.path, leaf)
        self._raise_if_memory_killed(reason, fn)
        blob = b"".join(out)
        if returncode != 0 or not blob:
            tail = b"".join(err).decode(errors="replace")[-2000:]
            raise PartitionRunError(
                f"partition '{self.path}': child running {getattr(fn, '__qualname__', fn)!r} "
                f"exited with status {returncode} without a result; stderr: {tail!r}"
            )
        ok, value, remote_tb = pickle.loads(blob)
        if ok:
            result: T = value
            return result
        if isinstance(value, BaseException):
            value.add_note(f"raised in partition '{self.path}':\n{remote_tb}")
            raise value
        raise PartitionRunError(f"partition '{self.path}': {value}")

    with_partition = run

    def _raise_if_memory_killed(self, reason: str | None, fn: object) -> None:
        killer = _MEMORY_KILLERS.get(ExitReason.parse(reason).kind) if reason else None
        if killer is not None:
            raise PartitionMemoryExceeded(
                f"partition '{self.path}': {getattr(fn, '__qualname__', fn)!r} was killed "
                f"by {killer} at memory.max {self.node.effective_memory_max} bytes"
            )


class PartitionGuard:
    """``with PartitionGuard(p):`` - processes spawned through ``guard.spawn`` land in ``p``.

    Restores the previous partition on exit, exception or not. Reusable, not re-entrant
    (nest two guards instead)."""

    def __init__(self, partition: ManagedPartition) -> None:
        self.partition = partition
        self._token: contextvars.Token[ManagedPartition | None] | None = None

    def __enter__(self) -> ManagedPartition:
        if self._token is not None:
            raise RuntimeError("this PartitionGuard is already active; nest a new one")
        self.partition._alive()  # noqa: SLF001 - the guard is part of the partition API
        self._token = _current.set(self.partition)
        return self.partition

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, self._token = self._token, None
        assert token is not None
        _current.reset(token)


def spawn(
    argv: Sequence[str],
    *,
    leaf: str = "guard",
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    pass_fds: Iterable[int] = (),
) -> subprocess.Popen[bytes]:
    """The project's spawn API: start ``argv`` in the current guard's partition.

    Outside any ``PartitionGuard`` it is a plain ``subprocess.Popen`` in the caller's own
    context (same descriptor conventions)."""
    part = current_partition()
    if part is not None:
        return part.spawn(
            argv, leaf=leaf, cwd=cwd, env=env, stdout=stdout, stderr=stderr, pass_fds=pass_fds
        )
    # The same settings a backend starts a worker with, minus the partition.
    outside = _request("", leaf, argv, cwd, env, stdout, stderr, pass_fds)
    return subprocess.Popen(list(argv), **outside.popen_kwargs())


def _request(
    path: str,
    leaf: str,
    argv: Sequence[str],
    cwd: str | None,
    env: Mapping[str, str] | None,
    stdout: int | None,
    stderr: int | None,
    pass_fds: Iterable[int],
) -> SpawnRequest:
    """The guard API's conventions as a ``SpawnRequest``: the caller's environment and
    its own stdout/stderr unless told otherwise."""
    return SpawnRequest(
        partition=path,
        leaf=leaf,
        argv=list(argv),
        cwd=cwd,
        env=dict(os.environ if env is None else env),
        stdout=1 if stdout is None else stdout,
        stderr=2 if stderr is None else stderr,
        pass_fds=tuple(pass_fds),
    )


def _drain(fd: int, sink: list[bytes]) -> None:
    with os.fdopen(fd, "rb", closefd=True) as f:
        while chunk := f.read(65536):
            sink.append(chunk)


# The child: sys.path first (so the callable's module imports as in the caller), then the
# call; the reply is (ok, value, traceback text). Unpicklable results become an error.
_CHILD = """
import os, pickle, sys, traceback
with os.fdopen(int(sys.argv[1]), "rb") as f:
    sys.path[:] = pickle.load(f)
    fn, args, kwargs = pickle.load(f)
try:
    reply = (True, fn(*args, **kwargs), "")
except BaseException as exc:
    reply = (False, exc, traceback.format_exc())
try:
    blob = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
except Exception as exc:
    blob = pickle.dumps((False, RuntimeError(f"result not picklable: {exc!r}"), ""))
with os.fdopen(int(sys.argv[2]), "wb") as f:
    f.write(blob)
"""
