"""The database roles of deploy/k8s (database-roles.psql), on a private PostgreSQL: the migrator
owns the schema and runs the migrations and the partition maintenance; the services' role
reads and writes every table and can change none of them."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from devstack import infra
from services.common.db import Database
from services.common.migrations import migrate
from services.common.perf import PerformanceMonitor
from services.common.settings import PostgresSettings
from services.telemetry.retention import RetentionJob

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "deploy/k8s/components/in-cluster-datastores/database-roles.psql"
DATABASE = "genmesh_roles"
MIGRATOR, APP = "genmesh_migrator", "genmesh_app"


def as_role(url: str, role: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


def run_roles_script(url: str) -> None:
    psql = shutil.which("psql")
    assert psql is not None, "psql is installed on this machine"
    subprocess.run(
        [
            psql,
            url,
            "-X",
            "-q",
            "-v",
            f"database={DATABASE}",
            "-v",
            f"migrator={MIGRATOR}",
            "-v",
            f"app={APP}",
            "-v",
            "app_password=not-used-with-trust-auth",
            "-f",
            str(ROLES),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[infra.Server]:
    started = infra.private_postgres(tmp_path_factory.mktemp("roles"))
    try:
        yield started
    finally:
        started.stop()


async def test_the_migrator_owns_the_schema_and_the_services_only_touch_rows(
    server: infra.Server,
) -> None:
    admin = await asyncpg.connect(server.url)
    try:
        await admin.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await admin.close()
    url = infra.with_database(server.url, DATABASE)
    run_roles_script(url)
    run_roles_script(url)  # idempotent
    migrator_url, app_url = as_role(url, MIGRATOR), as_role(url, APP)
    assert await migrate(migrator_url)  # every migration, as the migrator

    app = await asyncpg.connect(app_url)
    try:
        # Rows of every table (partitions are reached through their parents).
        tables = await app.fetch(
            """SELECT c.relname,
                      has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'INSERT')
                      AND has_table_privilege(c.oid, 'UPDATE')
                      AND has_table_privilege(c.oid, 'DELETE') AS dml
               FROM pg_class c
               WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
                 AND NOT c.relispartition"""
        )
        assert {"profiles", "funnel_events", "security_events", "idempotency_keys"} <= {
            t["relname"] for t in tables
        }
        assert [t["relname"] for t in tables if not t["dml"]] == []
        await app.execute("INSERT INTO profiles (user_id) VALUES ('u1')")
        await app.execute("UPDATE profiles SET daily_used = 1 WHERE user_id = 'u1'")
        assert await app.fetchval("SELECT daily_used FROM profiles WHERE user_id = 'u1'") == 1
        await app.execute(
            "INSERT INTO security_events (event_type, severity) VALUES ('test', 'low')"
        )
        await app.execute("DELETE FROM profiles WHERE user_id = 'u1'")
        # ... and nothing of the schema.
        assert not await app.fetchval("SELECT has_schema_privilege('public', 'CREATE')")
        owned = "SELECT count(*) FROM pg_class WHERE relowner = $1::regrole"
        assert await app.fetchval(owned, APP) == 0
        for ddl in (
            "CREATE TABLE intruder (id int)",
            "ALTER TABLE profiles ADD COLUMN intruder int",
            "CREATE INDEX intruder_idx ON profiles (email)",
            "DROP TABLE feedback",
            "TRUNCATE quota_reservations",
            "ALTER TABLE funnel_events DETACH PARTITION "
            + await app.fetchval(
                "SELECT min(inhrelid::regclass::text) FROM pg_inherits "
                "WHERE inhparent = 'funnel_events'::regclass"
            ),
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute(ddl)
    finally:
        await app.close()


async def test_partitions_are_kept_by_the_migrator_and_the_services_backstop_needs_no_ddl(
    server: infra.Server,
) -> None:
    """The events-retention CronJob (90 days, three months ahead, as the migrator) leaves the
    telemetry replicas' in-process run (91 days, two months ahead, as the services' role)
    nothing to do; asked to do more, the services' role is refused."""
    url = infra.with_database(server.url, DATABASE)

    async def retention(role: str, days: int, ahead: int) -> RetentionJob:
        db = Database(PostgresSettings(database_url=as_role(url, role)), PerformanceMonitor(1000))
        job = RetentionJob(db, days, ahead, 3600)
        try:
            job.last_result = await job.run_once()
        finally:
            await db.close()
        return job

    cronjob = await retention(MIGRATOR, 90, 3)
    assert cronjob.last_result is not None and len(cronjob.last_result.created) == 2
    backstop = await retention(APP, 91, 2)
    assert backstop.last_result is not None and not backstop.last_result.changed
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await retention(APP, 91, 4)
