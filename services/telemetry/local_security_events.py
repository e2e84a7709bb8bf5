"""Security events that telemetry itself observes (admin actions on its admin API, bursts of
failures at the edge), stored straight through its own store: telemetry is the security-event
store, so it does not call itself over the network. Best effort, like the other services'
events (services/common/security_events.py): written in the background, never delaying or
failing the request that observed them, dropped when too many are pending."""

from __future__ import annotations

from genmesh.telemetry.v1 import telemetry_pb2
from services.common.background import BackgroundTasks
from services.common.security_events import MAX_PENDING, BackgroundSecurityEvents
from services.telemetry import records
from services.telemetry.store import TelemetryStore


class LocalSecurityEvents(BackgroundSecurityEvents):
    """A SecurityEventSink over the telemetry store."""

    def __init__(
        self, store: TelemetryStore, background: BackgroundTasks, max_pending: int = MAX_PENDING
    ) -> None:
        super().__init__(background, max_pending)
        self.store = store

    async def deliver(self, request: telemetry_pb2.RecordSecurityEventRequest) -> None:
        # The same validation as RecordSecurityEvent, then the same group commit.
        await self.store.record_security_event(records.security_event_row(request))
