"""Early pytest plugin: choose trio's I/O back end before pytest-trio imports trio.

``tests/conftest.py`` calls ``select_io_backend()`` too, but pytest imports
plugins registered through entry points -- pytest-trio among them, which
imports trio -- *before* any conftest.  On Linux that is harmless (trio
imports natively and the manager is swapped before the first ``trio.run``);
where trio has no native back end (QNX Neutrino) ``import trio`` fails
outright unless the poll back end was installed first.  ``-p`` plugins are
imported ahead of entry-point plugins, hence, on QNX:

    python -m pytest -p tests.conftest_poll
"""

from supervisord_qnx.iomanager import select_io_backend

IO_BACKEND = select_io_backend()
