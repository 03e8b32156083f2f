"""Fixtures for the trust operations tests: a store of each backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from federation.store import Store, open_store


@pytest.fixture(params=["embedded", pytest.param("etcd", marks=pytest.mark.etcd)])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "embedded":
        return "memory://"
    return str(request.getfixturevalue("etcd_server").url)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    async with open_store(store_url) as opened:
        yield opened
