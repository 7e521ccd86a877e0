"""The chaos soak's settings: how long it runs (``--soak-seconds``, registered in
tests/conftest.py, or ``SUPERVISORD_QNX_SOAK_SECONDS``; 60 s by default, as in CI) and a
per-test timeout that grows with it."""

from __future__ import annotations

import os

import pytest

DEFAULT_SECONDS = 60.0
ENV = "SUPERVISORD_QNX_SOAK_SECONDS"
# Set-up, settling and the checks after the chaos, on a loaded machine.
OVERHEAD_SECONDS = 240


def soak_seconds(config: pytest.Config) -> float:
    option = config.getoption("soak_seconds", default=None)
    if option is not None:
        return float(option)
    return float(os.environ.get(ENV, DEFAULT_SECONDS))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The suite's 60 s per-test timeout cannot hold a soak: give it its length plus room.
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(pytest.mark.timeout(soak_seconds(config) + OVERHEAD_SECONDS))


@pytest.fixture
def soak_duration(request: pytest.FixtureRequest) -> float:
    return soak_seconds(request.config)
