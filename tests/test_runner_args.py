"""The wasm runner's command line: what the daemon builds is what the runner parses."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from supervisord_qnx.wasm.runner_args import RunnerArgs

text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=12)
key = text.filter(lambda k: k and "=" not in k and not k.startswith("-"))
positive = st.none() | st.integers(min_value=1, max_value=1 << 40)


@given(
    module=text.filter(lambda m: m and not m.startswith("-")),
    arg=st.lists(text.filter(lambda a: not a.startswith("-")), max_size=3),
    env=st.lists(st.tuples(key, text), max_size=3),
    preopen=st.lists(st.tuples(key, text), max_size=2),
    memory=positive,
    tables=positive,
    fuel=positive,
    timeout=st.none() | st.floats(min_value=0.001, max_value=1e6),
    no_cache=st.booleans(),
)
def test_to_argv_and_parse_are_inverses(
    module: str,
    arg: list[str],
    env: list[tuple[str, str]],
    preopen: list[tuple[str, str]],
    memory: int | None,
    tables: int | None,
    fuel: int | None,
    timeout: float | None,
    no_cache: bool,
) -> None:
    args = RunnerArgs(
        module=module,
        arg=tuple(arg),
        env=tuple(env),
        preopen=tuple(preopen),
        memory=memory,
        tables=tables,
        fuel=fuel,
        timeout=timeout,
        no_cache=no_cache,
        report="/run/r.report",
    )
    assert RunnerArgs.parse(args.to_argv()) == args
