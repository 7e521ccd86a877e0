"""Modules the daemon's libraries import but the daemon never uses, loaded only if used.

trio imports ``ssl`` (its TLS streams) and ``hmac`` (DTLS), structlog ``asyncio`` (its
async logger), pydantic ``secrets`` (its secret types), whether or not anyone uses them;
the daemon uses none of them, and they cost several MiB of its resident memory
(``hmac`` and ``secrets`` import ``hashlib``, which maps OpenSSL's libcrypto). ``defer``
puts a stand-in into ``sys.modules`` before those libraries are imported: their
``import ssl`` binds the stand-in, and the first attribute anybody reads from it loads
the real module, which then replaces the stand-in. So nothing changes for a user of the
module except when its cost is paid (issue 14: daemon RSS).

Only for the ``supervisord-qnx`` process (``cli/daemon.py``), before anything imports
trio or structlog; a module already imported is left alone.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

# What the daemon defers: imported by its libraries, used by none of its code paths.
# hmac and secrets (trio's DTLS, pydantic's secret types) would import hashlib, which
# loads OpenSSL's libcrypto; the daemon's own digests use supervisord_qnx/digest.py.
DAEMON_DEFERRED = ("ssl", "asyncio", "hmac", "secrets")


class _Deferred(types.ModuleType):
    """Stands in for a module until an attribute of it is read. The import system reads
    only ``__spec__`` (and ``__name__``) from a module it finds in ``sys.modules``:
    those are set here, so a repeated ``import`` does not load it. A package's
    ``__path__`` is not: importing one of its submodules reads it and so loads the
    real package first (``_Loaded`` then hands out the submodule that package loaded)."""

    def __getattr__(self, attr: str) -> Any:
        # Only for attributes the stand-in lacks, i.e. the real module's.
        return getattr(_load(self), attr)

    def __dir__(self) -> list[str]:
        return dir(_load(self))


class _Loaded(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """First on ``sys.meta_path`` while anything is deferred. ``import pkg.sub`` with
    ``pkg`` a stand-in: reading ``pkg.__path__`` loaded the real ``pkg``, which may
    have imported ``pkg.sub`` itself; the import in progress must then get that very
    module, not load a second copy of it."""

    def find_spec(
        self,
        fullname: str,
        path: Any = None,  # noqa: ARG002 - the finder protocol's
        target: Any = None,  # noqa: ARG002
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] not in _deferred or fullname not in sys.modules:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return sys.modules[spec.name]

    def exec_module(self, module: types.ModuleType) -> None:  # noqa: ARG002 - loaded already
        return None


_deferred: set[str] = set()
_finder = _Loaded()


def _load(stand_in: _Deferred) -> types.ModuleType:
    name = stand_in.__name__
    if sys.modules.get(name) is stand_in:
        del sys.modules[name]
    try:
        module = importlib.import_module(name)
    except BaseException:
        sys.modules.setdefault(name, stand_in)
        raise
    # Later readers of the stand-in find the real module's attributes without a lookup.
    stand_in.__dict__.update(module.__dict__)
    return module


def defer(*names: str) -> list[str]:
    """Put a stand-in for each of ``names`` that is not imported yet; return those."""
    deferred = []
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        stand_in = _Deferred(name)
        stand_in.__spec__ = spec
        sys.modules[name] = stand_in
        _deferred.add(name)
        deferred.append(name)
    if deferred and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    return deferred
