"""On-disk cache of compiled (native code) wasm modules for the runner.

Compiling with Cranelift costs tens to hundreds of milliseconds per start; a
restart loop would pay it every time. ``Module.serialize()`` gives wasmtime's
own artifact, which ``Module.deserialize`` maps back in a few milliseconds.

Why our own checksum on top of wasmtime's checks: deserialising is ``unsafe`` in
wasmtime's Rust API. The artifact *is* native machine code plus metadata, and
wasmtime only checks its header (version, target, engine flags), not the code
itself, so a truncated or bit-flipped file could be executed as garbage code
instead of failing cleanly. Every entry is therefore framed as::

    MAGIC (8) | sha256(payload) (32) | len(payload) as u64 LE (8) | payload

and anything that does not verify is treated as a miss and rebuilt. The checksum
catches *accidental* damage only: whoever can write the cache directory can also
write a valid checksum, so the directory must be private to the supervisor's
user; ``open_cache_dir`` refuses a directory that is not (the runner then
compiles in memory every time).

Entries are written to a temporary file in the same directory and renamed into
place, so readers see either the old entry or the complete new one. There is no
fsync: after a power cut the checksum turns a torn entry into a rebuild, which
is cheaper than syncing on every cold start.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Literal

import wasmtime

MAGIC = b"SQWCM01\n"
_HEADER = len(MAGIC) + 32 + 8

CacheState = Literal["hit", "miss", "rebuilt", "off"]


def wasmtime_fingerprint() -> str:
    """Identify the installed wasmtime build without importlib.metadata (slow to import).

    The native library's size and mtime change with any reinstall or upgrade, and
    the dist-info directory name carries the version; wasmtime rejects artifacts
    from another version anyway, this just keeps such entries from being
    rebuilt over and over under one key.
    """
    pkg_dir = os.path.dirname(wasmtime.__file__)
    parts = []
    site = os.path.dirname(pkg_dir)
    try:
        parts += sorted(n for n in os.listdir(site) if n.startswith("wasmtime-"))
    except OSError:
        pass
    for sub in os.listdir(pkg_dir) if os.path.isdir(pkg_dir) else []:
        lib = os.path.join(pkg_dir, sub, "_libwasmtime.so")
        try:
            st = os.stat(lib)
        except OSError:
            continue
        parts.append(f"{sub}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def cache_key(source: bytes, engine_flags: str) -> str:
    """Key an entry by module bytes, wasmtime build, machine and codegen-relevant flags."""
    h = hashlib.sha256()
    for part in (
        hashlib.sha256(source).digest(),
        wasmtime_fingerprint().encode(),
        os.uname().machine.encode(),
        engine_flags.encode(),
    ):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "supervisord-qnx", "wasm")


def open_cache_dir(path: str) -> str | None:
    """Create ``path`` (mode 0700) if needed; return it if it is safe to trust, else None.

    Safe means: a directory owned by us and not writable by group or others, since
    a writer could plant native code that we would map and run (see module doc).
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return None
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None
    return path


def frame(payload: bytes) -> bytes:
    return MAGIC + hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "little") + payload


def unframe(blob: bytes) -> bytes | None:
    """Return the payload of a framed entry, or None if it is damaged in any way."""
    if len(blob) < _HEADER or not blob.startswith(MAGIC):
        return None
    digest = blob[len(MAGIC) : len(MAGIC) + 32]
    length = int.from_bytes(blob[len(MAGIC) + 32 : _HEADER], "little")
    payload = blob[_HEADER:]
    if len(payload) != length or hashlib.sha256(payload).digest() != digest:
        return None
    return payload


def entry_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, key + ".cwasm")


def _store(path: str, module: wasmtime.Module) -> None:
    """Write atomically; a failure to cache is not a failure to run."""
    import tempfile  # only on a miss: it pulls in random/shutil, costly on every start

    directory = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".cwasm", dir=directory)
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(frame(bytes(module.serialize())))
        os.replace(tmp, path)
    except (OSError, wasmtime.WasmtimeError):
        try:
            os.unlink(tmp)
        except OSError:
            pass


def load_module(
    engine: wasmtime.Engine, source: bytes, engine_flags: str, cache_dir: str | None
) -> tuple[wasmtime.Module, CacheState]:
    """Return the compiled module for ``source`` (wasm binary or wat text) and how it was got.

    Raises ``wasmtime.WasmtimeError`` only when ``source`` itself does not compile;
    every cache problem degrades to a compile.
    """
    if cache_dir is None:
        return wasmtime.Module(engine, source), "off"
    path = entry_path(cache_dir, cache_key(source, engine_flags))
    state: CacheState = "miss"
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        blob = None
    except OSError:
        blob = b""  # unreadable: treat as damaged and replace it
    if blob is not None:
        payload = unframe(blob)
        if payload is not None:
            try:
                return wasmtime.Module.deserialize(engine, payload), "hit"
            except wasmtime.WasmtimeError:
                pass  # intact but incompatible (other wasmtime/flags): rebuild
        state = "rebuilt"
    module = wasmtime.Module(engine, source)
    _store(path, module)
    return module, state
