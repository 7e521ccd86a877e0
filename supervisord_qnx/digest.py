"""SHA-256 for the daemon's own small digests (runtime state checksum, names derived from
paths) without importing ``hashlib``.

``hashlib`` loads OpenSSL's libcrypto at import (about 3.3 MiB of the daemon's resident
memory, issue 14); the interpreter's built-in SHA-256 gives the same digests for these
few short inputs. Falls back to ``hashlib`` where the built-in module is missing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def _builtin_sha256() -> Callable[[bytes], Any]:
    # CPython's own implementation: _sha256 up to 3.11, _sha2 from 3.12.
    for name in ("_sha256", "_sha2"):
        try:
            return importlib.import_module(name).sha256  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    return importlib.import_module("hashlib").sha256  # type: ignore[no-any-return]


_sha256 = _builtin_sha256()


def sha256_hex(data: bytes) -> str:
    """The hex SHA-256 of ``data``, as ``hashlib.sha256(data).hexdigest()``."""
    return str(_sha256(data).hexdigest())
