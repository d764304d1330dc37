"""Fixtures shared by the integration tests of this folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import create_database, drop_database
from wildfire.connectors.replay import ReplayServer


@pytest.fixture
def server() -> Iterator[ReplayServer]:
    """A local HTTP server replaying the upstream APIs (routes set by each test)."""
    with ReplayServer() as srv:
        yield srv


@pytest.fixture
def pg_db(request: pytest.FixtureRequest, pg_url: str) -> Iterator[str]:
    """URL of a fresh, migrated PostgreSQL database for one test (named after its module), dropped afterwards."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    name, url = create_database(f"wf_{module}"[:40])
    try:
        yield url
    finally:
        drop_database(name)
