"""Shared fixtures: real PostgreSQL and Redis for every run, each run in its own database
and key prefix so runs never collide (see devstack.infra for where the servers come from)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from devstack import infra
from services.common.migrations import create_database_if_missing, migrate

RUN_ID = uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def scratch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("infra")


@pytest.fixture(scope="session")
def postgres_server(scratch_dir: Path) -> Iterator[infra.Server]:
    server = infra.postgres(scratch_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(scratch_dir: Path) -> Iterator[infra.Server | None]:
    server = infra.redis(scratch_dir)
    yield server
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
async def database_url(postgres_server: infra.Server) -> AsyncIterator[str]:
    """A fresh, migrated database for this run, dropped at the end."""
    name = f"genmesh_test_{RUN_ID}"
    url = infra.with_database(postgres_server.url, name)
    await create_database_if_missing(url)
    await migrate(url)
    yield url
    await infra.drop_database(postgres_server.url, name)


@pytest.fixture(scope="session")
def redis_url(redis_server: infra.Server | None) -> str:
    if redis_server is None:
        pytest.fail("no Redis: set REDIS_URL, run one on 127.0.0.1:6379, or install redis-server")
    return redis_server.url


@pytest.fixture(scope="session")
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """This run's key prefix; every key under it is deleted at the end."""
    prefix = f"genmesh-test-{RUN_ID}:"
    yield prefix
    await infra.delete_keys(redis_url, prefix)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()
