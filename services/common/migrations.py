"""Ordered, idempotent schema migrations: `NNNN_name.sql` files applied in order, each in its
own transaction, recorded in `schema_migrations`. An advisory lock lets several replicas (or a
Kubernetes Job and a developer) run it at once safely.

    python -m services.common.migrations [--dir migrations] [--create-database]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from services.common.settings import PostgresSettings

log = logging.getLogger(__name__)
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "migrations"
_LOCK_ID = 0x67656E6D  # "genm": any constant shared by every runner
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migration_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if _NAME.match(p.name))
    versions = [p.name[:4] for p in files]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a number in {directory}")
    return files


async def create_database_if_missing(dsn: str) -> bool:
    """Connect to the server's `postgres` database and create the target one if absent."""
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    if not name:
        return False
    admin = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(admin)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        # Identifiers cannot be parameters; quote_ident makes the name safe.
        quoted = await conn.fetchval("SELECT quote_ident($1)", name)
        await conn.execute(f"CREATE DATABASE {quoted}")
        return True
    finally:
        await conn.close()


async def migrate(dsn: str, directory: Path = DEFAULT_DIR) -> list[str]:
    """Apply what is not applied yet; returns the names applied now."""
    applied_now: list[str] = []
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version text PRIMARY KEY,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for path in migration_files(directory):
                version = path.name[:4]
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        path.name,
                    )
                applied_now.append(path.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    finally:
        await conn.close()
    return applied_now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="migrations folder")
    parser.add_argument(
        "--create-database", action="store_true", help="create the database if it is missing"
    )
    args = parser.parse_args()
    dsn = PostgresSettings().database_url

    async def run() -> None:
        if args.create_database and await create_database_if_missing(dsn):
            print(f"created database {urlsplit(dsn).path.lstrip('/')}")
        applied = await migrate(dsn, args.dir)
        print(f"migrations: applied {', '.join(applied)}" if applied else "migrations: up to date")

    try:
        asyncio.run(run())
    except (OSError, asyncpg.PostgresError) as err:
        sys.exit(f"migration failed: {err}")


if __name__ == "__main__":
    main()
