"""Monthly partitions of the event tables and their retention job, against the real PostgreSQL:
the months the migration creates, a month past retention dropped (with its event ids), months
created ahead, one run at a time, partition pruning of a date range, the migration of existing
rows, and an event retried in another month still counted as a duplicate."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import asyncpg
import pytest

from devstack import infra
from services.common.db import Database
from services.common.migrations import DEFAULT_DIR, migrate
from services.common.perf import PerformanceMonitor
from services.common.settings import PostgresSettings
from services.telemetry.group_commit import BatchLimits
from services.telemetry.records import FunnelEventRow
from services.telemetry.retention import (
    PARTITIONED_TABLES,
    RETENTION_LOCK_ID,
    RetentionJob,
    RetentionResult,
    add_months,
    month_start,
    partition_name,
    partitions_of,
)
from services.telemetry.store import TelemetryStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    database = Database(PostgresSettings(DATABASE_URL=database_url), PerformanceMonitor())
    yield database
    await database.close()


def job(database: Database, retention_days: int = 90, ahead: int = 2) -> RetentionJob:
    return RetentionJob(database, retention_days, ahead, interval_seconds=3600)


async def run(retention: RetentionJob) -> RetentionResult:
    """One run that did the work: a telemetry service of another test may hold the lock for
    the moment of its own run."""
    for _ in range(100):
        result = await retention.run_once()
        if not result.skipped:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("the retention lock stayed taken")


async def this_month(conn: asyncpg.Connection) -> datetime:
    return month_start(await conn.fetchval("SELECT now()"))


def bound(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S+00")


async def add_partition(conn: asyncpg.Connection, table: str, month: datetime) -> str:
    name = partition_name(table, month)
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} "
        f"FOR VALUES FROM ('{bound(month)}') TO ('{bound(add_months(month, 1))}')"
    )
    return name


async def partition_names(conn: asyncpg.Connection, table: str) -> list[str]:
    return [p.name for p in await partitions_of(conn, table)]


async def store_event(conn: asyncpg.Connection, created_at: datetime) -> uuid.UUID:
    """A funnel event stored as the telemetry store stores it: its id and the row together."""
    event_id = uuid.uuid4()
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO funnel_event_ids (event_id, created_at) VALUES ($1, $2)",
            event_id,
            created_at,
        )
        await conn.execute(
            "INSERT INTO funnel_events (event_id, event, created_at) VALUES ($1, 'page_view', $2)",
            event_id,
            created_at,
        )
    return event_id


async def store_security_event(conn: asyncpg.Connection, created_at: datetime) -> uuid.UUID:
    event_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO security_events (event_type, severity, created_at) "
        "VALUES ('test', 'low', $1) RETURNING id",
        created_at,
    )
    return event_id


async def test_the_migration_made_this_month_and_the_next_ones(db: asyncpg.Connection) -> None:
    month = await this_month(db)
    for table in PARTITIONED_TABLES:
        assert (
            await db.fetchval("SELECT relkind::text FROM pg_class WHERE relname = $1", table) == "p"
        )
        names = await partition_names(db, table)
        for ahead in range(3):
            assert partition_name(table, add_months(month, ahead)) in names
    # Without a default partition, a row of a month that has none is refused.
    with pytest.raises(asyncpg.PostgresError, match="no partition"):
        await store_event(db, add_months(month, 60))


async def test_a_month_past_retention_is_dropped_with_its_ids_and_newer_ones_kept(
    database: Database, db: asyncpg.Connection
) -> None:
    month = await this_month(db)
    old, last = add_months(month, -4), add_months(month, -1)
    for table in PARTITIONED_TABLES:
        await add_partition(db, table, old)
        await add_partition(db, table, last)
    old_event = await store_event(db, old.replace(day=15))
    last_event = await store_event(db, last.replace(day=15))
    old_security = await store_security_event(db, old.replace(day=15))
    last_security = await store_security_event(db, last.replace(day=15))

    # 60 days: the month four months ago ended at least 89 days ago, last month at most 31.
    result = await run(job(database, retention_days=60))

    assert sorted(result.dropped) == sorted(partition_name(t, old) for t in PARTITIONED_TABLES)
    assert result.created == ()
    assert result.ids_pruned >= 1
    for table in PARTITIONED_TABLES:
        names = await partition_names(db, table)
        assert partition_name(table, old) not in names
        for kept in (last, month, add_months(month, 1), add_months(month, 2)):
            assert partition_name(table, kept) in names
        assert await db.fetchval("SELECT to_regclass($1)", partition_name(table, old)) is None
    stored = await db.fetch(
        "SELECT event_id FROM funnel_events WHERE event_id = ANY($1::uuid[])",
        [old_event, last_event],
    )
    assert [r["event_id"] for r in stored] == [last_event]
    ids = await db.fetch(
        "SELECT event_id FROM funnel_event_ids WHERE event_id = ANY($1::uuid[])",
        [old_event, last_event],
    )
    assert [r["event_id"] for r in ids] == [last_event]
    security = await db.fetch(
        "SELECT id FROM security_events WHERE id = ANY($1::uuid[])", [old_security, last_security]
    )
    assert [r["id"] for r in security] == [last_security]

    # Nothing left to do: a second run changes nothing.
    again = await run(job(database, retention_days=60))
    assert not again.changed


async def test_months_ahead_are_created_as_full_partitions(
    database: Database, db: asyncpg.Connection
) -> None:
    month = await this_month(db)
    far = add_months(month, 4)
    result = await run(job(database, ahead=4))
    expected = {partition_name(t, add_months(month, m)) for t in PARTITIONED_TABLES for m in (3, 4)}
    try:
        assert expected <= set(result.created)
        for table in PARTITIONED_TABLES:
            assert partition_name(table, far) in await partition_names(db, table)
        # The parent's keys, indexes and checks hold in a partition the job attached.
        name = partition_name("funnel_events", far)
        indexes = {
            r["indexdef"].split(" USING ")[1]
            for r in await db.fetch("SELECT indexdef FROM pg_indexes WHERE tablename = $1", name)
        }
        assert "btree (event_id, created_at)" in indexes
        assert "btree (session_id)" in indexes
        when = far.replace(day=2)
        event_id = await store_event(db, when)
        in_partition = await db.fetchval(
            "SELECT tableoid::regclass::text FROM funnel_events WHERE event_id = $1", event_id
        )
        assert in_partition == name
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute(
                "INSERT INTO funnel_events (event_id, event, lang, created_at) "
                "VALUES ($1, 'x', $2, $3)",
                uuid.uuid4(),
                "x" * 40,
                when,
            )
        with pytest.raises(asyncpg.UniqueViolationError):
            await db.execute(
                "INSERT INTO funnel_events (event_id, event, created_at) VALUES ($1, 'x', $2)",
                event_id,
                when,
            )
    finally:
        for table in PARTITIONED_TABLES:
            for m in (3, 4):
                name = partition_name(table, add_months(month, m))
                await db.execute(f"ALTER TABLE {table} DETACH PARTITION {name}")
                await db.execute(f"DROP TABLE {name}")
        await db.execute("DELETE FROM funnel_event_ids WHERE created_at >= $1", add_months(far, -1))


async def test_a_run_skips_while_another_holds_the_lock(
    database: Database, database_url: str
) -> None:
    other = await asyncpg.connect(database_url)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", RETENTION_LOCK_ID)
        skipped = await job(database).run_once()
        assert skipped.skipped
        assert not skipped.changed
        assert "another run" in skipped.summary()
        await other.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_ID)
        assert not (await run(job(database))).skipped
    finally:
        await other.close()
    # The run let the lock go: anyone can take it now.
    probe = await asyncpg.connect(database_url)
    try:
        assert await probe.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK_ID)
    finally:
        await probe.close()


def scanned(plan: str, table: str) -> set[str]:
    return set(re.findall(rf"\b({table}_p\d{{4}}_\d{{2}})\b", plan))


@pytest.mark.parametrize("table", PARTITIONED_TABLES)
async def test_a_date_range_scans_only_its_months(db: asyncpg.Connection, table: str) -> None:
    month = await this_month(db)
    await add_partition(db, table, add_months(month, -1))
    next_month = add_months(month, 1)

    async def plan(start: datetime, end: datetime) -> str:
        # Literal bounds, as an ad hoc query has them (our own timestamps, no input).
        where = f"created_at >= '{bound(start)}' AND created_at < '{bound(end)}'"
        rows = await db.fetch(f"EXPLAIN SELECT count(*) FROM {table} WHERE {where}")  # noqa: S608
        return "\n".join(r[0] for r in rows)

    assert scanned(await plan(month, next_month), table) == {partition_name(table, month)}
    assert scanned(await plan(month.replace(day=10), month.replace(day=20)), table) == {
        partition_name(table, month)
    }
    assert scanned(await plan(add_months(month, -1), next_month), table) == {
        partition_name(table, add_months(month, -1)),
        partition_name(table, month),
    }
    # Without a range every month is scanned: the pattern above does see partitions.
    everything = await db.fetch(f"EXPLAIN SELECT count(*) FROM {table}")  # noqa: S608
    assert len(scanned("\n".join(r[0] for r in everything), table)) >= 4


async def test_an_interrupted_detach_is_finalized_and_its_month_dropped(
    database: Database, db: asyncpg.Connection, database_url: str
) -> None:
    month = await this_month(db)
    old = add_months(month, -7)
    name = await add_partition(db, "security_events", old)
    # A concurrent detach waits for the transactions that may see the partition; cancelled
    # while it waits, it leaves the partition pending detach.
    reader = await asyncpg.connect(database_url)
    detacher = await asyncpg.connect(database_url)
    try:
        tx = reader.transaction(isolation="repeatable_read")
        await tx.start()
        await reader.fetchval("SELECT count(*) FROM security_events")
        detach = asyncio.create_task(
            detacher.execute(f"ALTER TABLE security_events DETACH PARTITION {name} CONCURRENTLY")
        )
        pid = detacher.get_server_pid()
        for _ in range(200):
            waiting = await db.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
            )
            if waiting:
                break
            await asyncio.sleep(0.02)
        assert waiting, "the detach never waited for the reader"
        await db.execute("SELECT pg_cancel_backend($1)", pid)
        with pytest.raises(asyncpg.QueryCanceledError):
            await detach
        await tx.rollback()
    finally:
        await reader.close()
        await detacher.close()
    pending = {p.name: p.detach_pending for p in await partitions_of(db, "security_events")}
    assert pending[name] is True

    result = await run(job(database))

    assert name in result.dropped
    assert name not in await partition_names(db, "security_events")
    assert await db.fetchval("SELECT to_regclass($1)", name) is None


async def test_beside_a_default_partition_months_are_still_dropped_and_created(
    database: Database, db: asyncpg.Connection
) -> None:
    """A default partition (made by hand) forbids concurrent detaches: a plain one is used."""
    month = await this_month(db)
    old = await add_partition(db, "security_events", add_months(month, -9))
    await db.execute("CREATE TABLE security_events_default PARTITION OF security_events DEFAULT")
    try:
        result = await run(job(database, ahead=3))
        assert old in result.dropped
        assert partition_name("security_events", add_months(month, 3)) in result.created
        names = await partition_names(db, "security_events")
        assert "security_events_default" in names
        assert old not in names
    finally:
        await db.execute("DROP TABLE security_events_default")
        for table in PARTITIONED_TABLES:
            name = partition_name(table, add_months(month, 3))
            await db.execute(f"ALTER TABLE {table} DETACH PARTITION {name}")
            await db.execute(f"DROP TABLE {name}")


async def test_a_retried_event_is_a_duplicate_whatever_its_month(
    database: Database, db: asyncpg.Connection
) -> None:
    """funnel_event_ids keeps an event id unique across months: the first copy is stored in
    last month's partition, the retry arrives now and lands in this month's."""
    last = add_months(await this_month(db), -1)
    await add_partition(db, "funnel_events", last)
    first = await store_event(db, last.replace(day=3))
    store = TelemetryStore(database, BatchLimits(max_wait_seconds=0))
    now = datetime.now(last.tzinfo)

    def row(event_id: uuid.UUID) -> FunnelEventRow:
        return FunnelEventRow(str(event_id), None, "", "page_view", "", "", "{}", None, now)

    try:
        fresh = uuid.uuid4()
        counts = await store.track_events([row(first), row(fresh)])
        assert (counts.accepted, counts.duplicates) == (1, 1)
        again = await store.track_events([row(fresh)])
        assert (again.accepted, again.duplicates) == (0, 1)
    finally:
        await store.close()
    stored = await db.fetch(
        "SELECT e.event_id, e.created_at = i.created_at AS same_time "
        "FROM funnel_events e JOIN funnel_event_ids i USING (event_id) "
        "WHERE event_id = ANY($1::uuid[])",
        [first, fresh],
    )
    assert sorted((r["event_id"], r["same_time"]) for r in stored) == sorted(
        [(first, True), (fresh, True)]
    )


async def test_the_schedule_runs_at_start_and_survives_a_database_outage(
    database: Database,
) -> None:
    retention = job(database)
    await retention.start()
    try:
        for _ in range(200):
            if retention.last_result is not None and not retention.last_result.skipped:
                break
            await asyncio.sleep(0.05)
        assert retention.last_result is not None
    finally:
        await retention.stop()
    assert not retention.running

    closed = infra.free_port()
    nowhere = Database(
        PostgresSettings(
            DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed}/none", DB_RETRY_ATTEMPTS=1
        ),
        PerformanceMonitor(),
    )
    failing = job(nowhere)
    await failing.start()
    try:
        await asyncio.sleep(0.5)
        assert failing.running
        assert failing.last_result is None
    finally:
        await failing.stop()
        await nowhere.close()


def test_it_runs_by_hand(database_url: str) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "EVENTS_RETENTION_DAYS": "90",
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.telemetry.retention"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("events retention (90 days, 2 months ahead): "), done.stdout


async def test_existing_rows_move_into_their_months(
    postgres_server: infra.Server, tmp_path: Path
) -> None:
    name = f"genmesh_retention_{uuid.uuid4().hex[:8]}"
    url = infra.with_database(postgres_server.url, name)
    admin = await asyncpg.connect(infra.with_database(postgres_server.url, "postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    migrations = sorted(DEFAULT_DIR.glob("000[1-3]_*.sql"))
    assert [p.name[:4] for p in migrations] == ["0001", "0002", "0003"]
    for path in migrations[:2]:
        shutil.copy(path, tmp_path / path.name)
    conn = await asyncpg.connect(url)
    try:
        assert await migrate(url, tmp_path) == [p.name for p in migrations[:2]]
        month = month_start(await conn.fetchval("SELECT now()"))
        ages = {"14 months": add_months(month, -14), "2 months": add_months(month, -2)}
        times = [when.replace(day=9, hour=13) for when in ages.values()]
        times.append(await conn.fetchval("SELECT now()"))
        for when in times:
            await conn.executemany(
                "INSERT INTO funnel_events (event_id, user_id, session_id, event, source, lang, "
                "properties, client_ip, occurred_at, created_at) VALUES "
                "($1, 'u', 's', 'page_view', 'web', 'en', '{\"k\": 1}', '192.0.2.1', $2, $2)",
                [(uuid.uuid4(), when) for _ in range(3)],
            )
            await conn.executemany(
                "INSERT INTO security_events (event_type, severity, ip, details, created_at) "
                "VALUES ('test', 'high', '192.0.2.1', '{\"n\": 2}', $1)",
                [(when,) for _ in range(2)],
            )
        before = {
            t: sorted(map(tuple, await conn.fetch(f"SELECT * FROM {t}")))  # noqa: S608
            for t in PARTITIONED_TABLES
        }

        shutil.copy(migrations[2], tmp_path / migrations[2].name)
        assert await migrate(url, tmp_path) == [migrations[2].name]

        for table in PARTITIONED_TABLES:
            after = sorted(map(tuple, await conn.fetch(f"SELECT * FROM {table}")))  # noqa: S608
            assert after == before[table]
            # Every month from the oldest row's through two ahead, and nothing else.
            expected = [partition_name(table, add_months(month, m)) for m in range(-14, 3)]
            assert await partition_names(conn, table) == expected
            assert await conn.fetchval("SELECT to_regclass($1)", f"{table}_unpartitioned") is None
            oldest = await conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE tableoid = to_regclass($1)",  # noqa: S608
                partition_name(table, ages["14 months"]),
            )
            assert oldest == (3 if table == "funnel_events" else 2)
        assert sorted(
            map(tuple, await conn.fetch("SELECT event_id, created_at FROM funnel_event_ids"))
        ) == sorted(map(tuple, await conn.fetch("SELECT event_id, created_at FROM funnel_events")))
        checks = {
            r["conname"]
            for r in await conn.fetch(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'funnel_events'::regclass"
            )
        }
        assert {"funnel_events_pkey", "funnel_events_lang_check"} <= checks

        # The default retention (90 days) then drops the months from 14 months ago to about 4
        # months ago, and the ids of the events of 14 months ago; it keeps 2 months ago.
        database = Database(PostgresSettings(DATABASE_URL=url), PerformanceMonitor())
        try:
            result = await run(job(database))
        finally:
            await database.close()
        for table in PARTITIONED_TABLES:
            assert partition_name(table, ages["14 months"]) in result.dropped
            assert partition_name(table, add_months(month, -4)) in result.dropped
            assert (await partition_names(conn, table))[-5:] == [
                partition_name(table, add_months(month, m)) for m in range(-2, 3)
            ]
        assert result.created == ()
        assert result.ids_pruned == 3
        assert await conn.fetchval("SELECT count(*) FROM funnel_events") == 6
        assert await conn.fetchval("SELECT count(*) FROM funnel_event_ids") == 6
    finally:
        await conn.close()
        await infra.drop_database(postgres_server.url, name)
