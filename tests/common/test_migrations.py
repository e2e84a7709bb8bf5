from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest

from devstack import infra
from services.common.migrations import DEFAULT_DIR, migrate, migration_files

pytestmark = pytest.mark.integration


def test_migration_files_are_numbered_uniquely() -> None:
    names = [p.name for p in migration_files(DEFAULT_DIR)]
    assert names == sorted(names)
    assert names[0].startswith("0001_")


async def test_migrate_is_idempotent(database_url: str) -> None:
    # The session fixture already migrated; a second run applies nothing.
    assert await migrate(database_url) == []
    conn = await asyncpg.connect(database_url)
    try:
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        indexes = {
            r["indexname"]
            for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname='public'")
        }
    finally:
        await conn.close()
    assert {"profiles", "pro_wishlist", "feedback", "funnel_events", "security_events"} <= tables
    for index in (
        "profiles_is_pro_idx",
        "funnel_events_session_id_idx",
        "security_events_severity_idx",
        "feedback_rating_idx",
        "pro_wishlist_lang_idx",
    ):
        assert index in indexes


async def test_a_failing_migration_leaves_nothing_half_applied(
    postgres_server: infra.Server, tmp_path: Path
) -> None:
    name = f"genmesh_migr_{uuid.uuid4().hex[:8]}"
    url = infra.with_database(postgres_server.url, name)
    admin = await asyncpg.connect(infra.with_database(postgres_server.url, "postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        (tmp_path / "0001_ok.sql").write_text("CREATE TABLE a (x int);")
        (tmp_path / "0002_bad.sql").write_text("CREATE TABLE b (x int); SELECT nope;")
        with pytest.raises(asyncpg.PostgresError):
            await migrate(url, tmp_path)
        conn = await asyncpg.connect(url)
        try:
            versions = [
                r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")
            ]
            b_exists = await conn.fetchval("SELECT to_regclass('b') IS NOT NULL")
        finally:
            await conn.close()
        assert versions == ["0001"]
        assert b_exists is False
    finally:
        await admin.close()
        await infra.drop_database(postgres_server.url, name)
