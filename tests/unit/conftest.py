"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.fake_engine import FakeEngine


@pytest_asyncio.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    """A stand-in for the engine's HTTP server (see tests/fake_engine.py), started on an ephemeral port."""
    fake = FakeEngine()
    await fake.start()
    yield fake
    await fake.stop()
