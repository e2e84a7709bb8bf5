"""The private servers `make run` and the tests start when nothing else is there."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from devstack import infra

pytestmark = pytest.mark.integration


async def test_a_private_postgres_starts_serves_and_stops(tmp_path: Path) -> None:
    server = infra.private_postgres(tmp_path)
    try:
        assert server.origin == "private"
        conn = await asyncpg.connect(server.url)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    finally:
        server.stop()
    assert server.process is not None
    assert server.process.poll() is not None
    assert server.workdir is not None
    assert not server.workdir.exists()


async def test_a_private_redis_starts_serves_and_stops(tmp_path: Path) -> None:
    server = infra.private_redis(tmp_path)
    assert server is not None, "redis-server is installed on this machine"
    try:
        client = Redis.from_url(server.url)
        try:
            assert await client.ping()
        finally:
            await client.aclose()
    finally:
        server.stop()
    assert server.process is not None
    assert server.process.poll() is not None


def test_urls_from_the_environment_win(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db.example:5432/app")
    monkeypatch.setenv("REDIS_URL", "")
    assert infra.postgres(tmp_path).origin == "environment"
    assert infra.redis(tmp_path) is None  # empty REDIS_URL asks for the in-memory fallback


def test_a_missing_postgres_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(infra, "_postgres_bin", lambda name: None)
    with pytest.raises(infra.InfraError, match="apt-get install postgresql"):
        infra.private_postgres(tmp_path)


def test_with_database_keeps_the_server() -> None:
    url = infra.with_database("postgresql://u:p@h:5433/postgres?sslmode=require", "genmesh")
    assert url == "postgresql://u:p@h:5433/genmesh?sslmode=require"
