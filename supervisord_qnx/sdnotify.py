"""The sd_notify datagram protocol, without libsystemd.

A service manager that wants readiness and liveness from us (systemd with
``Type=notify``, or anything speaking the same protocol) puts an ``AF_UNIX`` datagram
socket in ``$NOTIFY_SOCKET``: a filesystem path, or an abstract name written with a
leading ``@``. Each message is one datagram of newline-separated ``KEY=VALUE``
assignments; we send ``READY=1`` once every autostart tenant is up or has failed,
``STOPPING=1`` when shutting down, ``WATCHDOG=1`` periodically and ``STATUS=...`` for
humans. Where no manager asked (QNX's SLM, a shell), ``$NOTIFY_SOCKET`` is unset and
every call is a no-op, so the daemon calls these unconditionally.

Why not libsystemd: it does not exist on QNX, and the protocol is one ``sendto``.
A fresh socket per message (rather than one kept open) costs a few microseconds at
the rates involved and survives the manager re-creating its socket.

The watchdog: the manager sets ``WATCHDOG_USEC`` (and, to say whom it means,
``WATCHDOG_PID``); a service must ping more often than that, and the usual rule,
followed here, is every half interval. ``WATCHDOG_PID`` naming another process means
the watchdog is not ours (we inherited the variables), so no pings.

The daemon must not pass these variables on to tenants, or a tenant could report
readiness for the daemon: ``MANAGER_VARIABLES`` lists what to strip.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

READY = "READY=1"
STOPPING = "STOPPING=1"
RELOADING = "RELOADING=1"
WATCHDOG = "WATCHDOG=1"
MANAGER_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class UnsupportedAddress(ValueError):
    """``$NOTIFY_SOCKET`` holds an address this module cannot send to (``vsock:``, a
    relative path). Readiness cannot be reported; the service itself is fine."""


def status(text: str) -> str:
    """A ``STATUS=`` line; a newline would start a new assignment, so it becomes a space."""
    return "STATUS=" + " ".join(text.splitlines())


def socket_address(env: Mapping[str, str] | None = None) -> str | None:
    """The address to send to (abstract names with a leading NUL), or ``None`` if unset."""
    value = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # systemd also gives vsock: addresses (a service in a VM); we speak only AF_UNIX. The
    # caller must treat this as "cannot notify", never as a reason to stop (daemon._notify).
    raise UnsupportedAddress(
        f"NOTIFY_SOCKET={value!r}: only a path or an @abstract name is supported"
    )


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one message (e.g. ``READY=1`` or ``"\\n".join([READY, status("up")])``).

    Returns ``False`` when no manager listens (``$NOTIFY_SOCKET`` unset), ``True`` once
    sent; raises ``OSError`` when the socket is set but the send fails, and
    ``UnsupportedAddress`` when it names an address family we cannot use, so the caller
    can log that the manager will consider us not ready.
    """
    address = socket_address(env)
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode("utf-8"), address)
    return True


def watchdog_period(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or ``None`` when
    no watchdog is set for this process."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


def clean_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the manager's variables, for a tenant's environment."""
    return {k: v for k, v in env.items() if k not in MANAGER_VARIABLES}
