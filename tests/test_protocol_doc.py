"""docs/protocol.md is enough to write a client: it lists exactly the methods served."""

from __future__ import annotations

import re
from pathlib import Path

from supervisord_qnx.control.methods import Methods

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def test_protocol_doc_lists_exactly_the_methods_the_daemon_serves() -> None:
    class NoDaemon:  # the table is built from the methods alone; none is called here
        pass

    served = set(Methods(NoDaemon()).table.names())  # type: ignore[arg-type]
    doc = DOC.read_text()
    section = doc[doc.index("## Methods") :]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))
    assert documented == served
