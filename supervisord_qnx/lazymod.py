"""Modules the daemon's libraries import but the daemon never uses, loaded only if used.

trio imports ``ssl`` (its TLS streams), ``hmac`` (DTLS) and ``idna`` (host names for
DNS), structlog ``asyncio`` (its async logger), pydantic ``secrets`` (its secret types),
whether or not anyone uses them;
the daemon uses none of them, and they cost several MiB of its resident memory
(``hmac`` and ``secrets`` import ``hashlib``, which maps OpenSSL's libcrypto). ``defer``
puts a stand-in into ``sys.modules`` before those libraries are imported: their
``import ssl`` binds the stand-in, and the first attribute anybody reads from it loads
the real module, which then replaces the stand-in. So nothing changes for a user of the
module except when its cost is paid (issue 14: daemon RSS). A function such a library
takes from the module by name at import (``FORWARDED``) is a forwarder until called.

Only for the ``supervisord-qnx`` process (``cli/daemon.py``), before anything imports
trio or structlog; a module already imported is left alone.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

# What the daemon defers: imported by its libraries, used by none of its code paths.
# hmac and secrets (trio's DTLS, pydantic's secret types) would import hashlib, which
# loads OpenSSL's libcrypto; the daemon's own digests use supervisord_qnx/digest.py.
# bz2 and lzma: shutil imports both (for its archive formats; ctypes.util imports
# shutil for trio's thread cache), which maps libbz2 and liblzma (0.4 MiB of RSS).
# idna: trio encodes a non-ASCII host name with it before a DNS look-up; the daemon
# resolves no names (its sockets are Unix sockets), and idna's tables are 0.1 MiB.
DAEMON_DEFERRED = (
    "ssl",
    "asyncio",
    "hmac",
    "secrets",
    "importlib.metadata",
    "bz2",
    "lzma",
    "idna",
)

# Functions that a library takes from a deferred module by ``from m import f`` when it is
# imported (reading ``f`` would load ``m`` at once): the stand-in hands out a forwarder
# that loads ``m`` at its first call instead. pydantic's plugin loader does this with
# ``entry_points``; structlog and pydantic read ``version`` and ``metadata`` lazily.
FORWARDED = {"importlib.metadata": ("entry_points", "version", "metadata", "distributions")}


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


class _Loaded:
    """First on ``sys.meta_path`` while anything is deferred. ``import pkg.sub`` with
    ``pkg`` a stand-in: reading ``pkg.__path__`` loaded the real ``pkg``, which may
    have imported ``pkg.sub`` itself; the import in progress must then get that very
    module, not load a second copy of it.

    A finder and loader by their methods, not an ``importlib.abc`` subclass: importing
    ``importlib.abc`` imports ``importlib.resources``, ``tempfile`` and ``shutil``, and
    shutil imports ``bz2`` and ``lzma``, before ``defer`` could stand in for them."""

    def find_spec(
        self,
        fullname: str,
        path: Any = None,  # noqa: ARG002 - the finder protocol's
        target: Any = None,  # noqa: ARG002
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] not in _deferred or fullname not in sys.modules:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)  # type: ignore[arg-type]

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


def _forwarder(stand_in: _Deferred, attr: str) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return getattr(_load(stand_in), attr)(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = attr
    return forward


def no_pydantic_plugins() -> None:
    """The first model pydantic builds looks for its plugins among the entry points of
    every installed distribution (``importlib.metadata``, which imports ``email``,
    ``zipfile`` and ``csv``: about 1.2 MiB of the daemon's memory, issue 14). The
    daemon's configuration is validated by pydantic alone: an empty plugin registry,
    set before any model is built, is what pydantic's own loader keeps when it found
    none. A pydantic whose loader has no such registry is left alone (and then pays)."""
    from pydantic.plugin import _loader

    if getattr(_loader, "_plugins", False) is None:
        _loader._plugins = {}  # noqa: SLF001 - its cache of plugins found, none here


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
        for attr in FORWARDED.get(name, ()):
            setattr(stand_in, attr, _forwarder(stand_in, attr))
        if name in FORWARDED and spec.submodule_search_locations is not None:
            # ``from pkg import f`` reads ``pkg.__path__`` first (is it a package?),
            # which would load it: the real one's path, for a package nobody imports
            # the submodules of (they load with the package, at the first call).
            stand_in.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = stand_in
        _deferred.add(name)
        deferred.append(name)
    if deferred and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    return deferred
