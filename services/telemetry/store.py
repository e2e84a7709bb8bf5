"""Where telemetry rows go: PostgreSQL, through group commit. Each call returns only after its
rows are committed. Feedback and security events are COPYed straight into their tables; a batch
of funnel events is one INSERT statement fed one array per column, which inserts those whose id
is new to `funnel_event_ids`, so a retried event is stored once (whatever month it lands in) and
each caller learns which of its events were new.

Feedback and wishlist requests may carry a client idempotency key (records.IdempotencyKey). The
key is claimed in `idempotency_keys` in the same transaction that writes the request's rows,
with the answer, so a retry is stored once and answered as the first request was (the same
feedback id; the same `created`), and a key reused with another request body is refused
(`key_reused`). Keys expire after `idempotency_ttl` and are pruned now and then.

A write that fails because of what one request holds fails that request only, and a database
that is away fails every waiting request with UNAVAILABLE (see group_commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import asyncpg
import grpc

from services.common.db import Database
from services.common.errors import FieldViolation, Reason, ServiceError
from services.telemetry.group_commit import (
    DEFAULT_LIMITS,
    BatchLimits,
    ContentFields,
    GroupCommitter,
    RefusedValue,
    classify,
    failure_error,
)
from services.telemetry.records import (
    FUNNEL_EVENT_COLUMNS,
    IDEMPOTENCY_KEY_FIELD,
    FeedbackRow,
    FunnelEventRow,
    IdempotencyKey,
    SecurityEventRow,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a key answers retries (the window the README documents for clients).
IDEMPOTENCY_TTL = timedelta(hours=24)
# Expired keys are deleted at most this often per replica, a batch per statement.
IDEMPOTENCY_PRUNE_INTERVAL_SECONDS = 600.0
IDEMPOTENCY_PRUNE_BATCH = 5_000

# Where the database's complaint about a column is reported, per table.
FEEDBACK_FIELDS = ContentFields(
    {c: c for c in ("rating", "comment", "lang", "generation_id")}, default="request"
)
WISHLIST_FIELDS = ContentFields({c: c for c in ("email", "lang")}, default="request")
# A request holds up to 100 events and the database does not say which one it refused.
EVENT_FIELDS = ContentFields(
    {
        c: "events"
        for c in ("event_id", "session_id", "event", "source", "lang", "properties", "occurred_at")
    },
    default="events",
)
SECURITY_EVENT_FIELDS = ContentFields(
    {c: c for c in ("event_type", "severity", "user_id", "ip", "details")}, default="request"
)

# A batch of funnel events is written by ONE statement (atomic on its own: no transaction, no
# staging table): the rows arrive as one array per column. An event id is unique across the
# monthly partitions through funnel_event_ids: the ids new to it (ordered by key, so concurrent
# batches take row locks in the same order: no deadlocks) and their events are inserted with
# the same created_at. The answer is the count inserted and, only when some were not (they
# were stored before), the ids that were.
INSERT_NEW_EVENTS = """
    WITH batch AS (
        SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::jsonb[], $8::text[], $9::timestamptz[])
            AS b (event_id, user_id, session_id, event, source, lang, properties, client_ip,
                  occurred_at)
    ),
    new_ids AS (
        INSERT INTO funnel_event_ids (event_id)
        SELECT event_id FROM batch ORDER BY event_id
        ON CONFLICT (event_id) DO NOTHING
        RETURNING event_id, created_at
    ),
    inserted AS (
        INSERT INTO funnel_events
            (event_id, user_id, session_id, event, source, lang, properties, client_ip,
             occurred_at, created_at)
        SELECT b.event_id, b.user_id, b.session_id, b.event, b.source, b.lang, b.properties,
               b.client_ip, b.occurred_at, n.created_at
        FROM batch b JOIN new_ids n USING (event_id)
        RETURNING event_id
    )
    SELECT count(*)::int AS inserted,
           CASE WHEN count(*) < cardinality($1::uuid[])
                THEN coalesce(array_agg(event_id), '{}') END AS ids
    FROM inserted"""
_INSERT_WISHLIST = """
    INSERT INTO pro_wishlist (user_id, email, lang) VALUES ($1, $2, $3)
    ON CONFLICT ((lower(email))) DO NOTHING
    RETURNING id"""

# Claim keys: a new key, or an expired one, becomes this request's (returned); a live key is
# left as it is, and locked until the transaction ends. A concurrent claim of the same key waits
# for the first transaction and then finds its row. Ordered so batches lock in the same order.
_CLAIM_KEYS = """
    INSERT INTO idempotency_keys AS k (route, scope, idempotency_key, fingerprint, response)
    SELECT c.route, c.scope, c.idempotency_key, c.fingerprint, c.response::jsonb
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[])
        AS c (route, scope, idempotency_key, fingerprint, response)
    ORDER BY c.route, c.scope, c.idempotency_key
    ON CONFLICT (route, scope, idempotency_key) DO UPDATE
        SET fingerprint = EXCLUDED.fingerprint, response = EXCLUDED.response, created_at = now()
        WHERE k.created_at < now() - $6::interval
    RETURNING route, scope, idempotency_key"""
_LOOKUP_KEYS = """
    SELECT route, scope, idempotency_key, fingerprint, response::text AS response
    FROM idempotency_keys
    JOIN unnest($1::text[], $2::text[], $3::text[]) AS w (route, scope, idempotency_key)
        USING (route, scope, idempotency_key)"""
_SET_RESPONSE = """
    UPDATE idempotency_keys SET response = $4::jsonb
    WHERE route = $1 AND scope = $2 AND idempotency_key = $3"""
# The age test is on the deleted row itself, so a key re-claimed meanwhile (its created_at
# moved) is re-checked and kept.
_PRUNE_KEYS = """
    DELETE FROM idempotency_keys
    WHERE created_at < now() - $1::interval
      AND (route, scope, idempotency_key) IN (
          SELECT route, scope, idempotency_key FROM idempotency_keys
          WHERE created_at < now() - $1::interval LIMIT $2)"""


@dataclass(frozen=True)
class EventCounts:
    accepted: int
    duplicates: int


@dataclass(frozen=True)
class _StoredKey:
    fingerprint: bytes
    # The first request's answer, as JSON.
    response: str | None
    # Claimed by this transaction (new or expired), rather than found.
    claimed: bool


def key_reused() -> ServiceError:
    """A key sent again with another request body. The idempotency draft answers 422; Envoy's
    transcoder has no gRPC code that becomes 422, so it is ALREADY_EXISTS (HTTP 409), with the
    header named as the offending field. Not retryable: the client needs a new key."""
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS,
        Reason.INVALID_ARGUMENT,
        "this Idempotency-Key was already used with a different request; send a new key "
        "for a new request",
        violations=(
            FieldViolation(IDEMPOTENCY_KEY_FIELD, "was already used with a different request body"),
        ),
        metadata={"header": IDEMPOTENCY_KEY_FIELD},
    )


class TelemetryStore:
    def __init__(
        self,
        db: Database,
        limits: BatchLimits = DEFAULT_LIMITS,
        idempotency_ttl: timedelta = IDEMPOTENCY_TTL,
    ) -> None:
        self.db = db
        self.idempotency_ttl = idempotency_ttl

        self.feedback: GroupCommitter[FeedbackRow, uuid.UUID] = GroupCommitter(
            "feedback", self._write_feedback, limits, FEEDBACK_FIELDS
        )
        self.events: GroupCommitter[FunnelEventRow, EventCounts] = GroupCommitter(
            "funnel_events", self._write_events, limits, EVENT_FIELDS
        )
        self.security: GroupCommitter[SecurityEventRow, None] = GroupCommitter(
            "security_events", self._write_security_events, limits, SECURITY_EVENT_FIELDS
        )
        self._next_prune = 0.0
        self._prunes: set[asyncio.Task[int]] = set()

    async def submit_feedback(self, row: FeedbackRow) -> uuid.UUID:
        """The stored feedback's id: this row's, or, for a retry of a keyed request, the first
        request's. Raises `key_reused()` for a key already used with another request body."""
        if row.idempotency is not None:
            self._maybe_prune()
        return await self.feedback.submit([row])

    async def track_events(self, rows: Sequence[FunnelEventRow]) -> EventCounts:
        return await self.events.submit(rows)

    async def record_security_event(self, row: SecurityEventRow) -> uuid.UUID:
        await self.security.submit([row])
        return row.id

    async def join_wishlist(
        self,
        email: str,
        lang: str,
        user_id: str | None,
        idempotency: IdempotencyKey | None = None,
    ) -> bool:
        """True when the email is new to the list (whatever its case), False otherwise; for a
        retry of a keyed request, what the first request was answered."""
        if idempotency is None:
            row = await self._guarded(
                WISHLIST_FIELDS,
                self.db.fetchrow("pro_wishlist.insert", _INSERT_WISHLIST, user_id, email, lang),
            )
            return row is not None
        key = idempotency
        self._maybe_prune()

        async def join(conn: asyncpg.Connection) -> bool:
            stored = (await self._claim(conn, [(key, None)]))[key.ident]
            if not stored.claimed:
                if stored.fingerprint != key.fingerprint:
                    raise key_reused()
                return bool(_answer(stored)["created"])
            with _driver_refusals():
                created = await conn.fetchrow(_INSERT_WISHLIST, user_id, email, lang) is not None
            await conn.execute(
                _SET_RESPONSE, key.route, key.scope, key.key, json.dumps({"created": created})
            )
            return created

        return await self._guarded(
            WISHLIST_FIELDS, self.db.transaction("pro_wishlist.insert_keyed", join)
        )

    async def prune_idempotency_keys(self) -> int:
        """Delete the keys past `idempotency_ttl`, a batch per statement; how many."""
        total = 0
        while True:
            status = await self.db.run(
                "idempotency_keys.prune",
                lambda conn: conn.execute(
                    _PRUNE_KEYS, self.idempotency_ttl, IDEMPOTENCY_PRUNE_BATCH
                ),
            )
            deleted = int(str(status).rsplit(" ", 1)[-1])
            total += deleted
            if deleted < IDEMPOTENCY_PRUNE_BATCH:
                return total

    async def close(self) -> None:
        for committer in (self.feedback, self.events, self.security):
            await committer.close()
        if self._prunes:
            await asyncio.gather(*self._prunes, return_exceptions=True)

    # -- idempotency keys ----------------------------------------------------------------------

    def _maybe_prune(self) -> None:
        """Start a prune of expired keys in the background if none ran lately on this replica.
        Expired keys are ignored anyway (a claim takes them over); this only bounds the table."""
        now = time.monotonic()
        if now < self._next_prune or self._prunes:
            return
        self._next_prune = now + IDEMPOTENCY_PRUNE_INTERVAL_SECONDS
        task = asyncio.create_task(self._prune_quietly(), name="idempotency-keys-prune")
        self._prunes.add(task)
        task.add_done_callback(self._prunes.discard)

    async def _prune_quietly(self) -> int:
        try:
            deleted = await self.prune_idempotency_keys()
        except Exception as err:  # best effort: the next interval tries again
            log.warning("pruning expired idempotency keys failed: %s", err)
            return 0
        if deleted:
            log.info("pruned %d expired idempotency keys", deleted)
        return deleted

    async def _claim(
        self, conn: asyncpg.Connection, keys: Sequence[tuple[IdempotencyKey, str | None]]
    ) -> dict[tuple[str, str, str], _StoredKey]:
        """Claim each (distinct) key with the answer to store, inside the caller's transaction,
        and return each key's stored state: claimed now, or found (a live key of an earlier
        request, to compare fingerprints with and replay)."""
        claimed_rows = await conn.fetch(
            _CLAIM_KEYS,
            [k.route for k, _ in keys],
            [k.scope for k, _ in keys],
            [k.key for k, _ in keys],
            [k.fingerprint for k, _ in keys],
            [response for _, response in keys],
            self.idempotency_ttl,
        )
        claimed = {(r["route"], r["scope"], r["idempotency_key"]) for r in claimed_rows}
        stored = {
            k.ident: _StoredKey(k.fingerprint, response, claimed=True)
            for k, response in keys
            if k.ident in claimed
        }
        others = [k for k, _ in keys if k.ident not in claimed]
        if others:
            found = await conn.fetch(
                _LOOKUP_KEYS,
                [k.route for k in others],
                [k.scope for k in others],
                [k.key for k in others],
            )
            for r in found:
                ident = (r["route"], r["scope"], r["idempotency_key"])
                stored[ident] = _StoredKey(bytes(r["fingerprint"]), r["response"], claimed=False)
        missing = [k.ident for k in others if k.ident not in stored]
        if missing:  # a live key conflicts, so it is there: this would be a bug
            raise RuntimeError(f"idempotency keys neither claimed nor found: {missing}")
        return stored

    @staticmethod
    async def _guarded(fields: ContentFields, call: Awaitable[T]) -> T:
        """`call`, with a database failure turned into what the caller should see (as group
        commit does for batches): INVALID_ARGUMENT for refused content, UNAVAILABLE when the
        database is away."""
        try:
            return await call
        except ServiceError:
            raise
        except Exception as err:
            translated = failure_error(err, classify(err), fields)
            if translated is err:
                raise
            raise translated from err

    # -- batch writers: one transaction per batch --------------------------------------------

    async def _write_feedback(
        self, batch: Sequence[Sequence[FeedbackRow]]
    ) -> list[uuid.UUID | Exception]:
        # The first submission of a key in the batch claims it with its own answer; the others
        # (retries that arrived together) are answered from what the key then holds.
        claims: dict[tuple[str, str, str], tuple[IdempotencyKey, str]] = {}
        for rows in batch:
            for row in rows:
                key = row.idempotency
                if key is not None and key.ident not in claims:
                    claims[key.ident] = (key, json.dumps({"feedback_id": str(row.id)}))

        async def write(conn: asyncpg.Connection) -> list[uuid.UUID | Exception]:
            stored = await self._claim(conn, list(claims.values())) if claims else {}
            records: list[tuple[object, ...]] = []
            results: list[uuid.UUID | Exception] = []
            for rows in batch:
                outcome: uuid.UUID | Exception = rows[0].id if rows else uuid.UUID(int=0)
                write_rows = True
                for row in rows:
                    key = row.idempotency
                    if key is None:
                        continue
                    state = stored[key.ident]
                    if state.fingerprint != key.fingerprint:
                        outcome, write_rows = key_reused(), False
                        break
                    first_id = uuid.UUID(str(_answer(state)["feedback_id"]))
                    if not (state.claimed and first_id == row.id):
                        # A retry, answered with the first request's id (or this very request,
                        # whose earlier attempt committed before its connection was lost).
                        outcome, write_rows = first_id, False
                        break
                if write_rows:
                    records.extend(row.record() for row in rows)
                results.append(outcome)
            if records:
                with _driver_refusals():
                    await conn.copy_records_to_table(
                        "feedback", records=records, columns=FeedbackRow.COLUMNS
                    )
            return results

        return await self.db.transaction("feedback.copy", write)

    async def _write_security_events(
        self, batch: Sequence[Sequence[SecurityEventRow]]
    ) -> list[None]:
        records = [row.record() for rows in batch for row in rows]

        async def copy(conn: asyncpg.Connection) -> None:
            with _driver_refusals():
                await conn.copy_records_to_table(
                    "security_events", records=records, columns=SecurityEventRow.COLUMNS
                )

        await self.db.transaction("security_events.copy", copy)
        return [None] * len(batch)

    async def _write_events(self, batch: Sequence[Sequence[FunnelEventRow]]) -> list[EventCounts]:
        columns, owned = event_columns(batch)

        async def insert(conn: asyncpg.Connection) -> asyncpg.Record:
            with _driver_refusals():
                row = await conn.fetchrow(INSERT_NEW_EVENTS, *columns)
            assert row is not None  # an aggregate answers one row
            return row

        result = await self.db.run("funnel_events.insert", insert)
        # None: every event of the batch was new. The ids come back as UUIDs; rows hold them as
        # canonical strings, which str() of a UUID is.
        inserted = None if result["ids"] is None else {str(event_id) for event_id in result["ids"]}
        return event_counts(batch, owned, inserted)


def event_columns(
    batch: Sequence[Sequence[FunnelEventRow]],
) -> tuple[list[tuple[object, ...]], list[list[str]]]:
    """The INSERT's column arrays, with each event id once, and the ids each submission owns.
    The first occurrence of an id in the batch owns its insert; later ones, in the same
    submission or another, are duplicates whatever the table holds."""
    seen: set[str] = set()
    owned: list[list[str]] = []
    unique: list[FunnelEventRow] = []
    for rows in batch:
        mine = []
        for row in rows:
            event_id = row.event_id
            if event_id not in seen:
                seen.add(event_id)
                unique.append(row)
                mine.append(event_id)
        owned.append(mine)
    # Rows are tuples in column order: transposed, they are the columns.
    columns: list[tuple[object, ...]] = (
        list(zip(*unique, strict=True)) if unique else [()] * len(FUNNEL_EVENT_COLUMNS)
    )
    return columns, owned


def event_counts(
    batch: Sequence[Sequence[FunnelEventRow]],
    owned: Sequence[Sequence[str]],
    inserted: set[str] | None,
) -> list[EventCounts]:
    """Each submission's counts: its owned ids that were inserted (all, when `inserted` is None)
    are accepted, the rest of its events duplicates."""
    counts = []
    for rows, ids in zip(batch, owned, strict=True):
        accepted = len(ids) if inserted is None else sum(1 for id_ in ids if id_ in inserted)
        counts.append(EventCounts(accepted=accepted, duplicates=len(rows) - accepted))
    return counts


def _answer(stored: _StoredKey) -> dict[str, object]:
    if stored.response is None:  # written in the transaction that claimed the key
        raise RuntimeError("an idempotency key without its answer")
    answer: dict[str, object] = json.loads(stored.response)
    return answer


@contextlib.contextmanager
def _driver_refusals() -> Iterator[None]:
    """Turn asyncpg's refusals to encode a value (before anything reaches the server) into
    RefusedValue: some are InterfaceErrors, which the database client would retry as
    transient and finally report as UNAVAILABLE."""
    try:
        yield
    except asyncpg.PostgresError:
        raise
    except (ValueError, TypeError, OverflowError) as err:
        raise RefusedValue(str(err)) from err
