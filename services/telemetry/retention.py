"""Retention of funnel and security events: monthly partitions created ahead, old ones dropped.

`funnel_events` and `security_events` are partitioned by month of `created_at`, in UTC
(migrations/0003_events_partitioned_by_month.sql): partition `<table>_pYYYY_MM` holds
[first of the month, first of the next). There is no default partition, so a row can only be
written once its month exists. The maintenance, for each table:

- creates the partitions of the current month and the `partitions_ahead` next ones that are
  missing (an empty table attached with ATTACH PARTITION, which takes only a SHARE UPDATE
  EXCLUSIVE lock on the parent: writers and readers are not blocked);
- drops the partitions whose whole range ended more than `retention_days` ago: DETACH
  PARTITION ... CONCURRENTLY (writers and readers are not blocked either; beside a default
  partition made by hand, which forbids it, a plain DETACH), then DROP TABLE. A detach left
  half done by an interrupted run is finalized by the next one, and a month table left
  detached but not dropped, still named `<table>_pYYYY_MM`, is dropped once past retention;
- for `funnel_events`, deletes the ids in `funnel_event_ids` (which makes an event id unique
  across months) below the oldest month still attached: they belong to no stored event.

Quota reservations are not handled here: the quota service's sweeper prunes settled ones
(services/quota/reservation_sweeper.py, QUOTA_SETTLED_RETENTION_SECONDS).

Every replica runs it at start and every interval; one at a time does the work, under a
session-level advisory lock (`RETENTION_LOCK_ID`) taken with pg_try_advisory_lock on one pooled
connection and released after; the others skip that round. Times are the database's clock, as
`created_at` is. By hand, against DATABASE_URL, with the EVENTS_* settings of the environment:

    python -m services.telemetry.retention
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from pydantic import ValidationError

from services.common.db import Database
from services.common.perf import PerformanceMonitor
from services.common.periodic import PeriodicJob
from services.telemetry.settings import TelemetrySettings

log = logging.getLogger(__name__)

# A connection, or one lent by the pool.
Connection = asyncpg.Connection | PoolConnectionProxy

# The advisory lock (one bigint key) that lets one maintenance run at a time, across replicas
# and runs by hand: "genm" "retn". Distinct from the migrations' lock (services/common).
RETENTION_LOCK_ID = 0x67656E6D_7265746E
# The tables partitioned by month.
PARTITIONED_TABLES: tuple[str, ...] = ("funnel_events", "security_events")
# How long creating a partition may wait for its lock before the run gives up (it only
# conflicts with other DDL, VACUUM and ANALYZE of the parent); the next run tries again. Below
# the pool's statement timeout (DB_COMMAND_TIMEOUT_SECONDS, 5 s), so the lock's error shows.
LOCK_TIMEOUT_MS = 3_000
# How long a concurrent detach may wait for the queries that still see the partition. Past
# it the detach is left pending, and the next run finalizes it.
DETACH_TIMEOUT_SECONDS = 300.0
# Ids deleted per statement (each well within the pool's statement timeout).
ID_PRUNE_BATCH = 5_000
# After a failed run, the next attempt comes this soon (or at the interval, if shorter).
RETRY_AFTER_FAILURE_SECONDS = 60.0

# Each partition of a table: its name, whether a concurrent detach of it is pending, whether it
# is a default partition, and its bounds (NULL for MINVALUE / MAXVALUE).
_PARTITIONS = r"""
    SELECT c.relname AS name, i.inhdetachpending AS detach_pending,
           b.expr = 'DEFAULT' AS is_default,
           (regexp_match(b.expr, '^FOR VALUES FROM \(''([^'']*)''\)'))[1]::timestamptz AS lower,
           (regexp_match(b.expr, ' TO \(''([^'']*)''\)$'))[1]::timestamptz AS upper
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS expr) b
    WHERE i.inhparent = to_regclass($1)
    ORDER BY lower NULLS FIRST, name"""
# The ids of funnel events (funnel_event_ids) go with their months, a batch at a time.
_FUNNEL_EVENTS = "funnel_events"
_PRUNE_EVENT_IDS = """
    DELETE FROM funnel_event_ids WHERE event_id IN (
        SELECT event_id FROM funnel_event_ids WHERE created_at < $1 LIMIT $2)"""
# Plain tables named like a month of the table, in its schema, that are no partition: what a
# run interrupted between detach and drop leaves.
_DETACHED = r"""
    SELECT c.relname AS name
    FROM pg_class c
    WHERE c.relkind = 'r' AND NOT c.relispartition
      AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = to_regclass($1))
      AND c.relname ~ ('^' || $1 || '_p[0-9]{4}_[0-9]{2}$')
    ORDER BY name"""


@dataclass(frozen=True)
class Partition:
    """A partition and its range [lower, upper); None is unbounded (MINVALUE / MAXVALUE)."""

    name: str
    lower: datetime | None
    upper: datetime | None
    detach_pending: bool = False
    is_default: bool = False

    def overlaps(self, start: datetime, end: datetime) -> bool:
        """Whether it holds any of [start, end). A default partition holds no range of its
        own: a month still gets a partition of its own beside it."""
        if self.is_default:
            return False
        return (self.lower is None or self.lower < end) and (
            self.upper is None or self.upper > start
        )


@dataclass(frozen=True)
class RetentionResult:
    """What one run did. `skipped`: another run held the lock, so this one did nothing."""

    skipped: bool = False
    created: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    ids_pruned: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.created or self.dropped or self.ids_pruned)

    def summary(self) -> str:
        if self.skipped:
            return "skipped: another run holds the retention lock"
        if not self.changed:
            return "nothing to do"
        return (
            f"created {', '.join(self.created) or 'none'}; "
            f"dropped {', '.join(self.dropped) or 'none'}; "
            f"pruned {self.ids_pruned} event ids"
        )


@dataclass
class _Changes:
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    ids_pruned: int = 0


def month_start(when: datetime) -> datetime:
    """The first instant of `when`'s month, in UTC."""
    utc = when.astimezone(UTC)
    return datetime(utc.year, utc.month, 1, tzinfo=UTC)


def add_months(month: datetime, count: int) -> datetime:
    index = month.year * 12 + month.month - 1 + count
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def partition_name(table: str, month: datetime) -> str:
    return f"{table}_p{month:%Y_%m}"


def _month_of_name(table: str, name: str) -> datetime | None:
    """The month a `<table>_pYYYY_MM` name stands for, None for any other name."""
    suffix = name.removeprefix(f"{table}_p")
    try:
        return datetime.strptime(suffix, "%Y_%m").replace(tzinfo=UTC)
    except ValueError:
        return None


async def partitions_of(conn: Connection, table: str) -> list[Partition]:
    """The partitions of `table`, oldest first."""
    if await conn.fetchval("SELECT to_regclass($1)::text", table) is None:
        raise RuntimeError(f"table {table} does not exist: are the migrations applied?")
    return [
        Partition(r["name"], r["lower"], r["upper"], r["detach_pending"], r["is_default"])
        for r in await conn.fetch(_PARTITIONS, table)
    ]


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class RetentionJob:
    """Runs `run_once` at `start` and every `interval_seconds` until `stop`."""

    def __init__(
        self,
        db: Database,
        retention_days: int,
        partitions_ahead: int,
        interval_seconds: float,
        *,
        tables: Sequence[str] = PARTITIONED_TABLES,
    ) -> None:
        if retention_days < 1 or partitions_ahead < 1 or interval_seconds <= 0:
            raise ValueError(
                "need retention_days >= 1, partitions_ahead >= 1, interval_seconds > 0"
            )
        self.db = db
        self.retention_days = retention_days
        self.partitions_ahead = partitions_ahead
        self.interval_seconds = interval_seconds
        self.tables = tuple(tables)
        # The last run's result (None before the first run ends, or when it failed).
        self.last_result: RetentionResult | None = None
        self._schedule = PeriodicJob(
            "events-retention",
            self._scheduled_run,
            interval_seconds,
            retry_seconds=RETRY_AFTER_FAILURE_SECONDS,
        )

    @classmethod
    def from_settings(cls, db: Database, settings: TelemetrySettings) -> RetentionJob:
        return cls(
            db,
            retention_days=settings.events_retention_days,
            partitions_ahead=settings.events_partitions_ahead,
            interval_seconds=settings.events_maintenance_interval_seconds,
        )

    # -- one run -------------------------------------------------------------------------------

    async def run_once(self) -> RetentionResult:
        """Create the missing months and drop the expired ones, for every table, if no other
        run holds the lock. Raises when the database fails; what was done before stays done,
        and the next run picks up from there."""
        pool = await self.db.pool()
        async with pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK_ID):
                return RetentionResult(skipped=True)
            try:
                changes = _Changes()
                now: datetime = await conn.fetchval("SELECT now()")
                for table in self.tables:
                    await self._maintain(conn, table, now, changes)
            finally:
                # Should the unlock fail, the pool resets the connection (and with it its
                # advisory locks) or discards it, so the lock never outlives this run.
                with contextlib.suppress(asyncpg.PostgresError, OSError):
                    await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_ID)
        return RetentionResult(
            created=tuple(changes.created),
            dropped=tuple(changes.dropped),
            ids_pruned=changes.ids_pruned,
        )

    async def _maintain(
        self, conn: Connection, table: str, now: datetime, changes: _Changes
    ) -> None:
        cutoff = now - timedelta(days=self.retention_days)
        partitions = await partitions_of(conn, table)

        # An interrupted concurrent detach first: until it is finalized no other can start.
        for p in partitions:
            if p.detach_pending:
                await conn.execute(
                    f"ALTER TABLE {_ident(table)} DETACH PARTITION {_ident(p.name)} FINALIZE",
                    timeout=DETACH_TIMEOUT_SECONDS,
                )
                log.info("finalized the detach of partition %s", p.name)
        # Month tables left detached (by an interrupted run, or just finalized) past retention.
        for row in await conn.fetch(_DETACHED, table):
            month = _month_of_name(table, row["name"])
            if month is not None and add_months(month, 1) <= cutoff:
                await conn.execute(f"DROP TABLE {_ident(row['name'])}")
                changes.dropped.append(row["name"])
                log.info("dropped detached month table %s", row["name"])
        partitions = [p for p in partitions if not p.detach_pending]

        first = month_start(now)
        for month in (add_months(first, i) for i in range(self.partitions_ahead + 1)):
            end = add_months(month, 1)
            if not any(p.overlaps(month, end) for p in partitions):
                await self._create(conn, table, month, end)
                changes.created.append(partition_name(table, month))
                log.info("created partition %s", partition_name(table, month))

        # A default partition (made by hand) forbids concurrent detaches: then a plain one,
        # which holds an ACCESS EXCLUSIVE lock on the table for a moment.
        concurrently = not any(p.is_default for p in partitions)
        for p in partitions:
            if not p.is_default and p.upper is not None and p.upper <= cutoff:
                await self._drop(conn, table, p.name, concurrently=concurrently)
                changes.dropped.append(p.name)
                log.info("dropped partition %s (its range ended %s)", p.name, p.upper)

        if table == _FUNNEL_EVENTS:
            changes.ids_pruned += await self._prune_event_ids(conn)

    @staticmethod
    async def _create(conn: Connection, table: str, month: datetime, end: datetime) -> None:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
            # The function (migration 0003) quotes the names and bounds itself.
            await conn.execute(
                "SELECT genmesh_attach_month_partition($1, $2, $3, $4)",
                table,
                partition_name(table, month),
                month,
                end,
            )

    @staticmethod
    async def _drop(conn: Connection, table: str, name: str, *, concurrently: bool) -> None:
        detach = f"ALTER TABLE {_ident(table)} DETACH PARTITION {_ident(name)}"
        if concurrently:
            # Not in a transaction (PostgreSQL refuses it there).
            await conn.execute(f"{detach} CONCURRENTLY", timeout=DETACH_TIMEOUT_SECONDS)
            await conn.execute(f"DROP TABLE {_ident(name)}")
            return
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
            await conn.execute(detach)
            await conn.execute(f"DROP TABLE {_ident(name)}")

    @staticmethod
    async def _prune_event_ids(conn: Connection) -> int:
        """Delete the ids older than the oldest partition still attached: no stored event has
        them (an id and its event are written together, with the same created_at)."""
        partitions = await partitions_of(conn, _FUNNEL_EVENTS)
        if not partitions or any(p.lower is None or p.is_default for p in partitions):
            return 0  # an unbounded or default partition (made by hand) may hold any old event
        oldest = min(p.lower for p in partitions if p.lower is not None)
        pruned = 0
        while True:
            status = await conn.execute(_PRUNE_EVENT_IDS, oldest, ID_PRUNE_BATCH)
            deleted = int(status.split()[-1])
            pruned += deleted
            if deleted < ID_PRUNE_BATCH:
                if pruned:
                    log.info("pruned %d funnel event ids older than %s", pruned, oldest)
                return pruned

    # -- the schedule --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between `start` and `stop` while the loop is alive."""
        return self._schedule.running

    async def start(self) -> None:
        """Run now, then every interval, until `stop`. Does not wait for the first run."""
        await self._schedule.start()

    async def stop(self) -> None:
        await self._schedule.stop()

    async def _scheduled_run(self) -> None:
        self.last_result = None
        result = await self.run_once()
        # Each change was logged as it was made (so a run that fails half-way still says
        # what it did); the summary is for debugging.
        self.last_result = result
        log.debug("events retention: %s", result.summary())


def main() -> None:
    """`python -m services.telemetry.retention`: one run now, and what it did."""
    try:
        settings = TelemetrySettings()
    except ValidationError as err:
        sys.exit(f"retention: invalid settings\n{err}")

    async def run() -> RetentionResult:
        db = Database(settings, PerformanceMonitor(settings.slow_operation_ms))
        try:
            return await RetentionJob.from_settings(db, settings).run_once()
        finally:
            await db.close()

    try:
        result = asyncio.run(run())
    except (OSError, asyncpg.PostgresError, RuntimeError) as err:
        sys.exit(f"retention failed: {err}")
    print(  # noqa: T201 - the command's output
        f"events retention ({settings.events_retention_days} days, "
        f"{settings.events_partitions_ahead} months ahead): {result.summary()}"
    )


if __name__ == "__main__":
    main()
