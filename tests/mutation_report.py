"""Summary of a ``make mutate`` run: the mutation score per module and the surviving
mutants per function, from ``mutmut results --all true``.

    python -m tests.mutation_report            # after `mutmut run`
    python -m tests.mutation_report --diffs    # and each survivor's diff

Not a test module (pytest collects ``test_*.py`` only). docs/testing.md explains the
kinds of survivors that remain.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
from pathlib import Path

MUTMUT = str(Path(sys.executable).parent / "mutmut")


def results() -> list[tuple[str, str]]:
    out = subprocess.run(
        [MUTMUT, "results", "--all", "true"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    rows = []
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            rows.append((name, status))
    return rows


def module_of(mutant: str) -> str:
    # supervisord_qnx.config.load.x__read_toml__mutmut_3, ...ǁClassǁmethod__mutmut_1
    return mutant.split(".x", 1)[0]


def function_of(mutant: str) -> str:
    return mutant.split(".x", 1)[1].rsplit("__mutmut_", 1)[0].strip("_ǁ").replace("ǁ", ".")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffs", action="store_true", help="print each survivor's diff")
    args = parser.parse_args()
    rows = results()
    if not rows:
        print("no mutmut results: run `make mutate` first", file=sys.stderr)
        return 1
    per_module: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for name, status in rows:
        per_module[module_of(name)][status] += 1
    total = collections.Counter[str]()
    print(f"{'module':36} {'mutants':>7} {'killed':>6} {'survived':>8} {'other':>5} {'score':>6}")
    for module, counts in sorted(per_module.items()):
        total.update(counts)
        n = sum(counts.values())
        other = n - counts["killed"] - counts["survived"]
        print(
            f"{module:36} {n:7} {counts['killed']:6} {counts['survived']:8} {other:5} "
            f"{counts['killed'] / n:6.0%}"
        )
    n = sum(total.values())
    print(f"{'all':36} {n:7} {total['killed']:6} {total['survived']:8} "
          f"{n - total['killed'] - total['survived']:5} {total['killed'] / n:6.0%}")  # fmt: skip
    print("\n(other: no test reaches the code, or the mutant timed out)")
    print("\nnot killed, per function:")
    by_function: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    for name, status in rows:
        if status != "killed":
            by_function[(module_of(name), function_of(name))][status] += 1
    for (module, function), counts in sorted(by_function.items()):
        print(f"  {module}.{function}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.diffs:
        for name, status in rows:
            if status != "killed":
                diff = subprocess.run(
                    [MUTMUT, "show", name], capture_output=True, text=True, timeout=60
                ).stdout
                changed = [x for x in diff.splitlines() if x[:1] in "+-" and x[:3] not in "+++---"]
                print(f"\n{name} ({status})\n  " + "\n  ".join(changed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
