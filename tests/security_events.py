"""A SecurityEventSink for tests: keeps what it is given, or fails on demand."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from genmesh.telemetry.v1 import telemetry_pb2
from services.common.identity import Identity


@dataclass
class Reported:
    event_type: str
    severity: int
    identity: Identity
    details: dict[str, str]


@dataclass
class RecordedEvents:
    events: list[Reported] = field(default_factory=list)
    # While set, report() raises (a broken sink), counting the calls in `failures`.
    fail: bool = False
    failures: int = 0

    def report(
        self,
        event_type: str,
        severity: telemetry_pb2.Severity.ValueType,
        identity: Identity,
        details: Mapping[str, str],
    ) -> None:
        if self.fail:
            self.failures += 1
            raise RuntimeError("sink is broken")
        self.events.append(Reported(event_type, severity, identity, dict(details)))

    def types(self) -> list[str]:
        return [e.event_type for e in self.events]
