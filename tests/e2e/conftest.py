from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chatd.store.database import Database
from tests.e2e.api_world import ApiWorld, serve_api


@pytest.fixture
async def api(db: Database) -> AsyncIterator[ApiWorld]:
    async with serve_api(db) as world:
        yield world
