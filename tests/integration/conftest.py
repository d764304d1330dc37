"""Fixtures shared by the integration tests of this folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wildfire.connectors.replay import ReplayServer


@pytest.fixture
def server() -> Iterator[ReplayServer]:
    """A local HTTP server replaying the upstream APIs (routes set by each test)."""
    with ReplayServer() as srv:
        yield srv
