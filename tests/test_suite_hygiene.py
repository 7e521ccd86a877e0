"""Rules for the test suite itself, checked on its source.

Every blocking wait on a child process has a timeout: a regression that hangs the
daemon, a CLI or a simulator must fail its test, not stall CI until the job is killed.
(pytest-timeout bounds each test as well, but a timeout at the call says which child
hung.)
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent

#: Module-level functions of ``subprocess`` that wait for the child.
SUBPROCESS_WAITS = {"run", "call", "check_call", "check_output"}

#: Files whose bare ``Popen.wait()`` calls are not checked (none today).
WAIT_NOT_CHECKED: set[str] = set()


def unbounded_waits(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    awaited = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Await)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if id(node) in awaited or any(k.arg == "timeout" for k in node.keywords):
            continue  # trio waits are bounded by the test's cancel scopes
        func = node.func
        subprocess_wait = func.attr in SUBPROCESS_WAITS and ast.unparse(func.value) == "subprocess"
        process_wait = func.attr == "communicate" or (
            func.attr == "wait" and not node.args and path.name not in WAIT_NOT_CHECKED
        )
        if subprocess_wait or process_wait:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:60]}")
    return found


def test_every_blocking_wait_on_a_child_has_a_timeout() -> None:
    found = [line for path in sorted(TESTS.glob("*.py")) for line in unbounded_waits(path)]
    assert found == [], "add timeout= to:\n" + "\n".join(found)


def test_the_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import subprocess\n"
        "subprocess.run(['true'])\n"
        "subprocess.run(['true'], timeout=5)\n"
        "proc = subprocess.Popen(['true'])\n"
        "proc.wait()\n"
        "proc.wait(5)\n"
        "proc.communicate()\n"
        "async def f(p):\n"
        "    await p.wait()\n"
    )
    assert [line.split(":")[1] for line in unbounded_waits(sample)] == ["2", "5", "7"]
