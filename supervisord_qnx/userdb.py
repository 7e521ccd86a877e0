"""Users and groups by name or number, from the system's user database (``pwd``/``grp``).

Used where the config names users and groups (``socket_group``, ``[[control.grant]]``):
a number is taken as it is (a uid need not have a passwd entry), a name must exist.
Plain lookups, no caching: the database may change while the daemon runs, and the
callers cache what they need per configuration.
"""

from __future__ import annotations

import grp
import os
import pwd


def uid_of(user: str | int) -> int | None:
    """The uid of a user name or number, or ``None`` for a name nobody has."""
    if isinstance(user, int):
        return user
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def gid_of(group: str | int) -> int | None:
    """The gid of a group name or number, or ``None`` for a name no group has."""
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


def groups_of_uid(uid: int, gid: int) -> frozenset[int]:
    """The groups the user database gives ``uid``: ``gid`` and its supplementary groups
    (none beyond ``gid`` for a uid without a passwd entry)."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return frozenset({gid})
    try:
        return frozenset(os.getgrouplist(name, gid))
    except OSError:
        return frozenset({gid})
