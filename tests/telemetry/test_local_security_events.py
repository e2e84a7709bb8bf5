"""Telemetry's own security events (admin credential failures on its admin API) go straight
to its store, in the background, best effort and bounded."""

from __future__ import annotations

import asyncio
import json
from typing import cast

from services.common.background import BackgroundTasks
from services.common.identity import Identity
from services.common.security_events import SEVERITY_HIGH, SEVERITY_MEDIUM
from services.telemetry.local_security_events import LocalSecurityEvents
from services.telemetry.records import SecurityEventRow
from services.telemetry.store import TelemetryStore

WHO = Identity(user_id="user-1", email="", client_ip="203.0.113.9")


class FakeStore:
    def __init__(self, gate: asyncio.Event | None = None, fail: bool = False) -> None:
        self.rows: list[SecurityEventRow] = []
        self.gate = gate
        self.fail = fail

    async def record_security_event(self, row: SecurityEventRow) -> object:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError("database down")
        self.rows.append(row)
        return row.id


def sink(
    store: FakeStore, background: BackgroundTasks, max_pending: int = 100
) -> LocalSecurityEvents:
    return LocalSecurityEvents(cast(TelemetryStore, store), background, max_pending)


async def test_events_are_stored_through_the_store_in_the_background() -> None:
    store, background = FakeStore(), BackgroundTasks()
    events = sink(store, background)
    events.report("admin_auth_failed", SEVERITY_HIGH, WHO, {"reason": "invalid", "method": "M"})
    assert store.rows == []  # not written inline: the request that observed it goes on
    await background.drain(5)
    [row] = store.rows
    assert (row.event_type, row.severity, row.user_id, row.ip) == (
        "admin_auth_failed",
        "high",
        "user-1",
        "203.0.113.9",
    )
    assert json.loads(row.details_json) == {"reason": "invalid", "method": "M"}
    assert events.pending == 0


async def test_pending_events_are_bounded_and_failures_are_swallowed() -> None:
    gate = asyncio.Event()
    store, background = FakeStore(gate=gate, fail=True), BackgroundTasks()
    events = sink(store, background, max_pending=3)
    for _ in range(5):
        events.report("admin_auth_failed", SEVERITY_MEDIUM, WHO, {"reason": "missing"})
    assert (events.pending, events.dropped, len(background)) == (3, 2, 3)
    gate.set()
    await background.drain(5)
    assert (events.pending, store.rows) == (0, [])
