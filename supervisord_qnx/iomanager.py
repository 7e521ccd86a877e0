"""Choose trio's I/O back end for this process.

Call :func:`select_io_backend` before anything imports trio -- first thing in
every entry point (daemon, CLI, test conftest).  It reads ``SUPERVISORD_QNX_IO``:

* unset / ``auto``: stock trio (epoll, kqueue, IOCP) where it exists, the
  poll(2) back end from :mod:`supervisord_qnx._trio_poll` where it does not
  (QNX Neutrino);
* ``poll``: force the poll(2) back end, e.g. to exercise it on Linux;
* ``native``: insist on stock trio; an error where it cannot run.

Raises RuntimeError when the poll back end is needed but the installed trio
is not a verified release, or when called too late (inside ``trio.run``).
"""

from __future__ import annotations

import os

from supervisord_qnx._trio_poll import ENV_VAR, select_backend

__all__ = ["ENV_VAR", "select_io_backend"]


def select_io_backend() -> str:
    """Install the back end chosen by ``SUPERVISORD_QNX_IO``; return "poll" or "native"."""
    return select_backend(os.environ.get(ENV_VAR, ""))
