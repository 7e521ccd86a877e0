"""Partition paths -> QNX APS partition names. Pure: no I/O.

APS names are flat, at most 15 characters, contain no ``/`` and must not start with a
digit (QNX 7.x ``aps create``); tree paths are ``/``-joined and much longer. The mapping
must be:

* **deterministic per path**, independent of the rest of the tree, because APS
  partitions outlive the daemon (they cannot be deleted before reboot) and the next
  daemon start must find the same partition under the same name, whatever tenants
  were added or removed meanwhile;
* **readable** where it can be: ``tenants/web`` becomes ``tenants.web``;
* **injective in practice**, and checked where it is not.

So a path whose components are free of ``.`` and which fits in 15 characters as
``a.b.c`` is used as is. Anything else becomes ``<first 8 chars of the leaf name>+<6 hex
digits of SHA-256(path)>``: the ``+`` cannot occur in a readable name (config names
never hold it), so the two forms never collide with each other; two long paths collide
only if 24 bits of their hashes do, which ``collisions`` reports as an admission
problem rather than leaving to ``aps create``.

A path cannot map when a component is outside the config name alphabet (a tree built in
code rather than from a validated file) or when it would take the name of the boot
partition ``System``.
"""

from __future__ import annotations

import hashlib
import re

NAME_MAX = 15
SYSTEM = "System"
_COMPONENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_PREFIX = 8
_HASH_DIGITS = NAME_MAX - _PREFIX - 1


class UnmappablePath(ValueError):
    """The path has no valid APS name; ``str()`` says why."""


def aps_name(path: str) -> str:
    """The APS partition name for a tree path (``"tenants/web"`` -> ``"tenants.web"``)."""
    if not path:
        raise UnmappablePath("the root partition is the daemon's own APS partition")
    parts = path.split("/")
    for part in parts:
        if not _COMPONENT.match(part):
            raise UnmappablePath(
                f"component {part!r} of '{path}' is not a name like 'web' or 'db_1' "
                "(letters, digits, '_', '.', '-'; not starting with a digit)"
            )
    readable = ".".join(parts)
    if len(readable) <= NAME_MAX and not any("." in p for p in parts):
        name = readable
    else:
        digest = hashlib.sha256(path.encode()).hexdigest()[:_HASH_DIGITS]
        name = f"{parts[-1][:_PREFIX]}+{digest}"
    if name.lower() == SYSTEM.lower():
        raise UnmappablePath(f"'{path}' would be named {name!r}, the boot partition's name")
    return name


def is_valid(name: str) -> bool:
    """What ``aps create`` accepts (QNX 7.x Utilities Reference)."""
    return 0 < len(name) <= NAME_MAX and "/" not in name and not name[0].isdigit()


def collisions(paths: list[str]) -> dict[str, list[str]]:
    """Names that more than one of ``paths`` maps to (unmappable paths are skipped)."""
    seen: dict[str, list[str]] = {}
    for path in paths:
        try:
            seen.setdefault(aps_name(path), []).append(path)
        except UnmappablePath:
            continue
    return {name: found for name, found in seen.items() if len(found) > 1}
