"""TelemetryStore's group commit against real PostgreSQL when writes fail: a request whose rows
PostgreSQL refuses fails alone while the rest of its batch commits; a database that goes away
fails every caller of the batch with UNAVAILABLE and commits nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import pytest

from devstack import infra
from services.common.db import Database
from services.common.errors import Reason, ServiceError
from services.common.migrations import create_database_if_missing, migrate
from services.common.perf import PerformanceMonitor
from services.common.settings import PostgresSettings
from services.telemetry.group_commit import BatchLimits
from services.telemetry.records import FeedbackRow, FunnelEventRow
from services.telemetry.store import TelemetryStore

pytestmark = pytest.mark.integration


def feedback(**fields: object) -> FeedbackRow:
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "user_id": None,
        "client_ip": "192.0.2.10",
        "generation_id": None,
        "rating": 4,
        "comment": f"fine {uuid.uuid4()}",
        "lang": "en",
    }
    return FeedbackRow(**{**values, **fields})  # type: ignore[arg-type]


def event(**fields: object) -> FunnelEventRow:
    values: dict[str, object] = {
        "event_id": str(uuid.uuid4()),
        "user_id": None,
        "session_id": "s",
        "event": "page_view",
        "source": "",
        "lang": "en",
        "properties_json": "{}",
        "client_ip": None,
        "occurred_at": datetime.now(UTC),
    }
    return FunnelEventRow(**{**values, **fields})  # type: ignore[arg-type]


def database_for(url: str, retry_attempts: int = 3) -> Database:
    settings = PostgresSettings(DATABASE_URL=url, DB_RETRY_ATTEMPTS=retry_attempts)
    return Database(settings, PerformanceMonitor())


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[TelemetryStore]:
    database = database_for(database_url)
    # Long enough for every submission of a test to share the first batch.
    s = TelemetryStore(database, BatchLimits(max_wait_seconds=0.2))
    try:
        yield s
    finally:
        await s.close()
        await database.close()


def assert_unavailable(result: object) -> None:
    assert isinstance(result, ServiceError), result
    assert result.code is grpc.StatusCode.UNAVAILABLE
    assert result.reason is Reason.DEPENDENCY_UNAVAILABLE
    assert result.retry_after_seconds is not None and result.retry_after_seconds > 0
    assert any(k == "retry-after" for k, _ in result.trailing_metadata())


def refused_field(result: object) -> str:
    assert isinstance(result, ServiceError), result
    assert result.code is grpc.StatusCode.INVALID_ARGUMENT
    [violation] = result.violations
    return violation.field


async def stored_feedback(db: asyncpg.Connection, rows: Sequence[FeedbackRow]) -> set[uuid.UUID]:
    found = await db.fetch(
        "SELECT id FROM feedback WHERE id = ANY($1::uuid[])", [r.id for r in rows]
    )
    return {r["id"] for r in found}


async def test_poisoned_feedback_fails_alone_and_its_batch_commits(
    store: TelemetryStore, db: asyncpg.Connection
) -> None:
    # Rows that skipped the request checks, each refused by PostgreSQL (or by the driver) in
    # its own way, among good ones, all in one batch.
    poisoned = {
        "comment": feedback(comment="a\x00b"),  # 22021: text cannot hold NUL
        "lang": feedback(lang="x" * 40),  # 23514: feedback_lang_check
        "rating": feedback(rating=9),  # 23514: feedback_rating_check
        "request": feedback(rating=70_000),  # not a smallint: the driver refuses it
    }
    good = [feedback() for _ in range(6)]
    rows = [good[0], poisoned["comment"], *good[1:3], poisoned["lang"], good[3]]
    rows += [poisoned["rating"], *good[4:], poisoned["request"]]
    results = await asyncio.gather(
        *(store.submit_feedback(r) for r in rows), return_exceptions=True
    )

    by_row = dict(zip((r.id for r in rows), results, strict=True))
    assert [by_row[r.id] for r in good] == [r.id for r in good]
    assert {field: refused_field(by_row[r.id]) for field, r in poisoned.items()} == {
        field: field for field in poisoned
    }
    assert await stored_feedback(db, rows) == {r.id for r in good}
    stats = store.feedback.stats
    assert stats.largest_batch_submissions == len(rows)  # they did share a batch
    assert stats.split_batches >= 1
    assert stats.refused_submissions == len(poisoned)


async def test_a_poisoned_event_request_fails_alone_and_names_events(
    store: TelemetryStore, db: asyncpg.Connection
) -> None:
    good = [[event(), event()] for _ in range(3)]
    bad = [event(), event(lang="x" * 40)]  # funnel_events_lang_check, in INSERT ... SELECT
    results = await asyncio.gather(
        *(store.track_events(rows) for rows in [good[0], bad, *good[1:]]),
        return_exceptions=True,
    )
    assert refused_field(results[1]) == "events"
    assert isinstance(results[1], ServiceError)
    assert "lang" in results[1].violations[0].description
    assert [(c.accepted, c.duplicates) for c in (results[0], *results[2:])] == [(2, 0)] * 3  # type: ignore[union-attr]
    ids = [e.event_id for rows in [*good, bad] for e in rows]
    stored = {
        str(r["event_id"])
        for r in await db.fetch(
            "SELECT event_id FROM funnel_events WHERE event_id = ANY($1::uuid[])", ids
        )
    }
    assert stored == {e.event_id for rows in good for e in rows}
    # The refused request left no id behind: sent again, corrected, its events are new.
    counts = await store.track_events([bad[0], event()])
    assert (counts.accepted, counts.duplicates) == (2, 0)


async def test_a_connection_lost_mid_batch_fails_every_caller_and_commits_nothing(
    store: TelemetryStore, db: asyncpg.Connection, database_url: str
) -> None:
    """The batch's transaction is waiting on a lock when its backend is terminated (57P01, as
    when an administrator or a failover ends it), and so are the database client's retries:
    no caller is told its row is stored, and none is. Only this run's own backends are
    terminated; the server keeps running."""
    rows = [feedback() for _ in range(4)]
    # Another session: pg_stat_activity is a snapshot fixed for a whole transaction.
    admin = await asyncpg.connect(database_url)
    await db.execute("BEGIN")
    await db.execute("LOCK TABLE feedback IN ACCESS EXCLUSIVE MODE")
    tasks = [asyncio.create_task(store.submit_feedback(r)) for r in rows]
    terminated = 0
    try:
        async with asyncio.timeout(60):
            while not all(t.done() for t in tasks):
                terminated += await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> $1"
                    # asyncpg's COPY first reads the table's columns: that waits too.
                    " AND wait_event_type = 'Lock' AND query LIKE '%\"feedback\"%'",
                    db.get_server_pid(),
                )
                await asyncio.sleep(0.05)
    finally:
        await db.execute("ROLLBACK")
        await admin.close()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert terminated >= 1
    for result in results:
        assert_unavailable(result)
    assert await stored_feedback(db, rows) == set()
    assert store.feedback.stats.largest_batch_submissions == len(rows)
    assert store.feedback.stats.unavailable_submissions == len(rows)
    # The pool replaces the lost connections: the next request is stored.
    again = feedback()
    assert await store.submit_feedback(again) == again.id
    assert await stored_feedback(db, [again]) == {again.id}


async def test_a_database_server_that_stops_fails_every_caller_with_unavailable(
    tmp_path: Path,
) -> None:
    """A private PostgreSQL (never the shared one) shut down under a store holding pooled
    connections: every caller of the batch gets UNAVAILABLE with a retry delay, and none hangs."""
    server = infra.private_postgres(tmp_path)
    assert server.process is not None
    database: Database | None = None
    store: TelemetryStore | None = None
    try:
        url = infra.with_database(server.url, "genmesh")
        await create_database_if_missing(url)
        await migrate(url)
        database = database_for(url, retry_attempts=2)
        store = TelemetryStore(database, BatchLimits(max_wait_seconds=0.2))
        warm = feedback()
        assert await store.submit_feedback(warm) == warm.id
        # Fast shutdown (SIGINT): sessions are ended (57P01), as in a restart or failover.
        os.killpg(server.process.pid, signal.SIGINT)
        server.process.wait(timeout=60)
        rows = [feedback() for _ in range(5)]
        async with asyncio.timeout(60):
            results = await asyncio.gather(
                *(store.submit_feedback(r) for r in rows), return_exceptions=True
            )
        for result in results:
            assert_unavailable(result)
        assert store.feedback.stats.unavailable_submissions == len(rows)
    finally:
        if store is not None:
            await store.close()
        if database is not None:
            await database.close()
        server.stop()
