"""The spawn path's side of tenant confinement (docs/security.md#tenants): the
``ProcessSettings`` of one start, and the few files a worker that no longer runs as the
daemon's user must still reach (its notify socket, the wasm runner's report file).

Every file is handed over by owner, never by opening it to everyone: the socket and
the report become the worker's uid's, mode 0600, in directories that are searchable
but not listable (0711), so another tenant can neither send to the socket nor write
the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
from pathlib import Path

from supervisord_qnx.config import identity
from supervisord_qnx.config.model import Config, TenantSpec, WorkerBase
from supervisord_qnx.partition.backend import Backend, BackendError, SpawnRequest
from supervisord_qnx.partition.process import ProcessSettings

#: The PATH a worker gets unless its tenant sets one: never the daemon's own.
WORKER_PATH = "/usr/local/bin:/usr/bin:/bin"


def settings_for(
    config: Config, tenant: TenantSpec, worker: WorkerBase, index: int
) -> ProcessSettings:
    """The worker's settings; ``OSError`` (a ``spawn-failed`` start, not a crash) when its
    user or group vanished since the config was loaded. Blocking: ``pwd``/``grp``."""
    position = next((i for i, w in enumerate(tenant.worker) if w.name == worker.name), index)
    try:
        return identity.process_settings(config, tenant, worker, position)
    except identity.IdentityError as exc:
        raise OSError(errno.EPERM, f"{exc.key}: {exc.reason}") from None


def _other_owner(settings: ProcessSettings) -> tuple[int, int] | None:
    if settings.uid is None or settings.uid == os.geteuid():
        return None
    gid = settings.gid if settings.gid is not None else settings.uid
    return settings.uid, gid


def _searchable(directory: Path) -> None:
    """Let other users pass through a directory the daemon made, without listing it."""
    st = os.lstat(directory)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
        os.chmod(directory, stat.S_IMODE(st.st_mode) | 0o111)


def grant(path: str | Path, settings: ProcessSettings, *, create: bool = False) -> None:
    """Make ``path`` (the worker's own notify socket or report file) its worker's: owner
    uid/gid, mode 0600, its directory searchable. Nothing when the worker runs as the
    daemon's user. ``create``: make an empty regular file first (never through a
    symlink). Blocking."""
    owner = _other_owner(settings)
    if owner is None:
        return
    path = Path(path)
    if create:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.chown(path, *owner, follow_symlinks=False)
        if not os.path.islink(path):
            os.chmod(path, 0o600)
    _searchable(path.parent)


def per_user_cache(request: SpawnRequest) -> SpawnRequest:
    """The wasm runner's compiled-module cache, one directory per worker uid
    (``wasm-cache/uid-N``, that uid's, 0700): the runner trusts only a directory of its
    own, and a tenant must never map native code another user could have written.
    Blocking."""
    owner = _other_owner(request.process)
    argv = list(request.argv)
    if owner is None or "--cache-dir" not in argv:
        return request
    i = argv.index("--cache-dir") + 1
    shared = Path(argv[i])
    own = shared / f"uid-{owner[0]}"
    shared.mkdir(mode=0o700, parents=True, exist_ok=True)
    _searchable(shared)
    with contextlib.suppress(FileExistsError):
        os.mkdir(own, 0o700)
    st = os.lstat(own)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"{own} is not a directory")
    if (st.st_uid, st.st_gid) != owner:
        os.chown(own, *owner, follow_symlinks=False)
    argv[i] = str(own)
    return dataclasses.replace(request, argv=argv)


def container_writes(request: SpawnRequest, report: Path) -> SpawnRequest:
    """A container wasm worker's report file and module cache stay writable in it.
    Blocking."""
    argv = list(request.argv)
    extra = [str(report)]
    if "--cache-dir" in argv:
        cache = argv[argv.index("--cache-dir") + 1]
        Path(cache).mkdir(mode=0o700, parents=True, exist_ok=True)  # a bind mount needs it
        extra.append(cache)
    process = dataclasses.replace(request.process, writable=(*request.process.writable, *extra))
    return dataclasses.replace(request, process=process)


def delegate(backend: Backend, partition: str, settings: ProcessSettings) -> None:
    """``delegate = true``: the partition's directory becomes the worker's uid's (every
    start, so a partition re-created from outside is handed over again). Blocking."""
    if settings.uid is None:
        return  # the daemon's own user already owns it
    gid = settings.gid if settings.gid is not None else settings.uid
    try:
        backend.delegate(partition, settings.uid, gid)
    except BackendError as exc:
        raise OSError(errno.EPERM, str(exc)) from None
