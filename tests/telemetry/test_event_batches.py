"""A batch of funnel events as the INSERT's columns, and each submission's counts: the first
occurrence of an id in the batch owns its insert, whatever the case it is spelled in."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from genmesh.telemetry.v1 import telemetry_pb2
from services.common.identity import Identity
from services.telemetry import records
from services.telemetry.records import FUNNEL_EVENT_COLUMNS, FunnelEventRow
from services.telemetry.store import EventCounts, event_columns, event_counts

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
GUEST = Identity(user_id="", email="", client_ip="203.0.113.9")


def rows(*event_ids: str) -> list[FunnelEventRow]:
    events = [telemetry_pb2.FunnelEvent(event_id=i, event="page_view") for i in event_ids]
    return records.funnel_event_rows(events, GUEST, NOW)


def test_rows_transposed_are_the_columns_in_the_statements_order() -> None:
    (row,) = rows(str(uuid.uuid4()))
    columns, owned = event_columns([[row]])
    assert len(columns) == len(FUNNEL_EVENT_COLUMNS)
    assert dict(zip(FUNNEL_EVENT_COLUMNS, columns, strict=True)) == {
        "event_id": (row.event_id,),
        "user_id": (None,),
        "session_id": ("",),
        "event": ("page_view",),
        "source": ("",),
        "lang": ("",),
        "properties": ("{}",),
        "client_ip": ("203.0.113.9",),
        "occurred_at": (NOW,),
    }
    assert owned == [[row.event_id]]


def test_an_empty_batch_has_empty_columns() -> None:
    assert event_columns([]) == ([()] * len(FUNNEL_EVENT_COLUMNS), [])


def test_upper_and_lowercase_ids_are_one_event_owned_by_its_first_occurrence() -> None:
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    batch = [rows(a.upper(), b, a), rows(b.upper(), c), rows(c, a.upper())]
    columns, owned = event_columns(batch)
    assert columns[0] == (a, b, c)
    assert owned == [[a, b], [c], []]
    assert event_counts(batch, owned, None) == [
        EventCounts(accepted=2, duplicates=1),
        EventCounts(accepted=1, duplicates=1),
        EventCounts(accepted=0, duplicates=2),
    ]
    # Ids the table held already (b) are duplicates for their owner too.
    assert event_counts(batch, owned, {a, c}) == [
        EventCounts(accepted=1, duplicates=2),
        EventCounts(accepted=1, duplicates=1),
        EventCounts(accepted=0, duplicates=2),
    ]
