"""Where telemetry rows go: PostgreSQL, through group commit. Each call returns only after its
rows are committed. Feedback and security events are COPYed straight into their tables; funnel
events are COPYed into a per-transaction staging table and inserted with ON CONFLICT DO
NOTHING, so a retried event is stored once and each caller learns which of its events were new.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from services.common.db import Database
from services.telemetry.group_commit import DEFAULT_LIMITS, BatchLimits, GroupCommitter
from services.telemetry.records import FeedbackRow, FunnelEventRow, SecurityEventRow

_STAGING = "funnel_events_staging"
_CREATE_STAGING = """
    CREATE TEMP TABLE funnel_events_staging (
        event_id    uuid NOT NULL,
        user_id     text,
        session_id  text NOT NULL,
        event       text NOT NULL,
        source      text NOT NULL,
        lang        text NOT NULL,
        properties  jsonb NOT NULL,
        client_ip   text,
        occurred_at timestamptz NOT NULL
    ) ON COMMIT DROP"""
# An event id is unique across the monthly partitions through funnel_event_ids: the ids new
# to it (ordered by key, so concurrent batches take row locks in the same order: no deadlocks)
# and their events are inserted by one statement, with the same created_at.
_INSERT_NEW_EVENTS = """
    WITH new_ids AS (
        INSERT INTO funnel_event_ids (event_id)
        SELECT event_id FROM funnel_events_staging ORDER BY event_id
        ON CONFLICT (event_id) DO NOTHING
        RETURNING event_id, created_at
    )
    INSERT INTO funnel_events
        (event_id, user_id, session_id, event, source, lang, properties, client_ip, occurred_at,
         created_at)
    SELECT s.event_id, s.user_id, s.session_id, s.event, s.source, s.lang, s.properties,
           s.client_ip, s.occurred_at, n.created_at
    FROM funnel_events_staging s JOIN new_ids n USING (event_id)
    RETURNING event_id"""
_INSERT_WISHLIST = """
    INSERT INTO pro_wishlist (user_id, email, lang) VALUES ($1, $2, $3)
    ON CONFLICT ((lower(email))) DO NOTHING
    RETURNING id"""


@dataclass(frozen=True)
class EventCounts:
    accepted: int
    duplicates: int


class TelemetryStore:
    def __init__(self, db: Database, limits: BatchLimits = DEFAULT_LIMITS) -> None:
        self.db = db

        self.feedback: GroupCommitter[FeedbackRow, None] = GroupCommitter(
            "feedback", self._write_feedback, limits
        )
        self.events: GroupCommitter[FunnelEventRow, EventCounts] = GroupCommitter(
            "funnel_events", self._write_events, limits
        )
        self.security: GroupCommitter[SecurityEventRow, None] = GroupCommitter(
            "security_events", self._write_security_events, limits
        )

    async def submit_feedback(self, row: FeedbackRow) -> uuid.UUID:
        await self.feedback.submit([row])
        return row.id

    async def track_events(self, rows: Sequence[FunnelEventRow]) -> EventCounts:
        return await self.events.submit(rows)

    async def record_security_event(self, row: SecurityEventRow) -> uuid.UUID:
        await self.security.submit([row])
        return row.id

    async def join_wishlist(self, email: str, lang: str, user_id: str | None) -> bool:
        """True when the email is new to the list (whatever its case), False otherwise."""
        row = await self.db.fetchrow("pro_wishlist.insert", _INSERT_WISHLIST, user_id, email, lang)
        return row is not None

    async def close(self) -> None:
        for committer in (self.feedback, self.events, self.security):
            await committer.close()

    # -- batch writers: one transaction per batch --------------------------------------------

    async def _write_feedback(self, batch: Sequence[Sequence[FeedbackRow]]) -> list[None]:
        records = [row.record() for rows in batch for row in rows]

        async def copy(conn: asyncpg.Connection) -> None:
            await conn.copy_records_to_table(
                "feedback", records=records, columns=FeedbackRow.COLUMNS
            )

        await self.db.transaction("feedback.copy", copy)
        return [None] * len(batch)

    async def _write_security_events(
        self, batch: Sequence[Sequence[SecurityEventRow]]
    ) -> list[None]:
        records = [row.record() for rows in batch for row in rows]

        async def copy(conn: asyncpg.Connection) -> None:
            await conn.copy_records_to_table(
                "security_events", records=records, columns=SecurityEventRow.COLUMNS
            )

        await self.db.transaction("security_events.copy", copy)
        return [None] * len(batch)

    async def _write_events(self, batch: Sequence[Sequence[FunnelEventRow]]) -> list[EventCounts]:
        # The first occurrence of an id in the batch (request index, position) owns its insert;
        # later ones, in the same request or another, are duplicates whatever the table holds.
        owner: dict[uuid.UUID, tuple[int, int]] = {}
        records = []
        for i, rows in enumerate(batch):
            for j, row in enumerate(rows):
                if row.event_id not in owner:
                    owner[row.event_id] = (i, j)
                    records.append(row.record())

        async def insert(conn: asyncpg.Connection) -> set[uuid.UUID]:
            await conn.execute(_CREATE_STAGING)
            await conn.copy_records_to_table(
                _STAGING, records=records, columns=FunnelEventRow.COLUMNS
            )
            return {r["event_id"] for r in await conn.fetch(_INSERT_NEW_EVENTS)}

        inserted = await self.db.transaction("funnel_events.insert", insert)
        counts = []
        for i, rows in enumerate(batch):
            accepted = sum(
                1
                for j, row in enumerate(rows)
                if owner[row.event_id] == (i, j) and row.event_id in inserted
            )
            counts.append(EventCounts(accepted=accepted, duplicates=len(rows) - accepted))
        return counts
