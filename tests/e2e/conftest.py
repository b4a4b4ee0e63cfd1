"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from chatd.providers.fake import FakeLLM, open_fake_llm
from chatd.runtime import register_default_model
from chatd.store.database import Database
from tests.e2e.api_world import ApiWorld, serve_api


@pytest.fixture
async def api(db: Database) -> AsyncIterator[ApiWorld]:
    async with serve_api(db) as world:
        yield world


@pytest.fixture
def home() -> Iterator[Path]:
    """A fresh CHATD_HOME for a chatd process, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="chatd-home-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def llm(db: Database) -> AsyncIterator[FakeLLM]:
    """The fake provider in the test process, registered as the default model."""
    async with open_fake_llm() as server:
        await register_default_model(db, base_url=f"{server.url}/v1")
        yield server
