"""The telemetry service in-process against the real PostgreSQL and Redis, called through the
generated stubs over a real channel."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from genmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.db import Database
from services.common.errors import Reason, ServiceError, error_info_from_call
from services.common.perf import PerformanceMonitor
from services.common.settings import PostgresSettings
from services.telemetry.app import TelemetryService, create_service
from services.telemetry.group_commit import BatchLimits
from services.telemetry.health import GENERATION_SERVICE, QUOTA_SERVICE
from services.telemetry.records import FunnelEventRow
from services.telemetry.settings import TelemetrySettings
from services.telemetry.store import TelemetryStore

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "telemetry-test-admin-token"


@dataclass
class HealthServer:
    server: grpc.aio.Server
    servicer: HealthServicer
    address: str


@dataclass
class Running:
    service: TelemetryService
    stub: telemetry_pb2_grpc.TelemetryServiceAsyncStub
    admin: telemetry_pb2_grpc.TelemetryAdminServiceAsyncStub
    settings: TelemetrySettings

    async def report(self, timeout: float = 10) -> telemetry_pb2.HealthReport:
        """The full health report, with the admin credential."""
        return await self.admin.GetHealthReport(
            telemetry_pb2.GetHealthReportRequest(),
            metadata=(("x-admin-token", ADMIN_TOKEN),),
            timeout=timeout,
        )


@asynccontextmanager
async def health_server(service_name: str, port: int = 0) -> AsyncIterator[HealthServer]:
    """A stand-in for generation or quota: just grpc.health.v1, SERVING."""
    server = grpc.aio.server()
    servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    try:
        yield HealthServer(server, servicer, f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


@asynccontextmanager
async def running(settings: TelemetrySettings) -> AsyncIterator[Running]:
    service = await create_service(settings)
    port = await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Running(
                service,
                telemetry_pb2_grpc.TelemetryServiceStub(channel),
                telemetry_pb2_grpc.TelemetryAdminServiceStub(channel),
                settings,
            )
    finally:
        await service.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(
    database_url: str, redis_url: str, prefix: str, **overrides: Any
) -> TelemetrySettings:
    values: dict[str, Any] = {
        "grpc_port": 0,
        "metrics_port": 0,
        "database_url": database_url,
        "redis_url": redis_url,
        # Its own prefix: no other test's published stats show up in this service's health.
        "redis_key_prefix": f"{prefix}telemetry-{uuid.uuid4().hex[:8]}:",
        "telemetry_batch_max_wait_ms": 20,
        "shutdown_grace_seconds": 1,
        # Behaviour, not speed: a busy test machine must not turn "healthy" into "degraded".
        "health_degraded_latency_ms": 60_000,
        "genmesh_admin_token": ADMIN_TOKEN,
        **overrides,
    }
    return TelemetrySettings(**values)


@pytest.fixture(scope="module")
async def dependencies() -> AsyncIterator[tuple[HealthServer, HealthServer]]:
    async with health_server(GENERATION_SERVICE) as gen, health_server(QUOTA_SERVICE) as quota:
        yield gen, quota


@pytest.fixture(scope="module")
async def telemetry(
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    dependencies: tuple[HealthServer, HealthServer],
) -> AsyncIterator[Running]:
    gen, quota = dependencies
    settings = make_settings(
        database_url, redis_url, redis_prefix, generation_addr=gen.address, quota_addr=quota.address
    )
    async with running(settings) as r:
        yield r


Metadata = tuple[tuple[str, str | bytes], ...]


def user(ip: str | None = None) -> tuple[str, Metadata]:
    user_id = f"user-{uuid.uuid4()}"
    return user_id, (
        ("x-genmesh-user-id", user_id),
        ("x-genmesh-client-ip", ip or f"198.51.100.{uuid.uuid4().int % 250 + 1}"),
    )


def trailers(err: grpc.aio.AioRpcError) -> Metadata:
    return cast(Metadata, tuple(err.trailing_metadata() or ()))


def violated(err: grpc.aio.AioRpcError) -> list[str]:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    info = error_info_from_call(trailers(err))
    assert info is not None
    assert info.reason is Reason.INVALID_ARGUMENT
    return [v.field for v in info.violations]


def funnel_event(**fields: Any) -> telemetry_pb2.FunnelEvent:
    values: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "event": "page_view",
        "session_id": "s-1",
    }
    return telemetry_pb2.FunnelEvent(**{**values, **fields})


# -- feedback, wishlist, events, security events -------------------------------------------


async def test_feedback_is_stored_with_the_callers_identity(
    telemetry: Running, db: asyncpg.Connection
) -> None:
    user_id, metadata = user(ip="203.0.113.50")
    reply = await telemetry.stub.SubmitFeedback(
        telemetry_pb2.SubmitFeedbackRequest(
            rating=4, comment="helpful", lang="fr", generation_id="gen-1"
        ),
        metadata=metadata,
    )
    row = await db.fetchrow("SELECT * FROM feedback WHERE id = $1", uuid.UUID(reply.feedback_id))
    assert row is not None
    assert (row["rating"], row["comment"], row["lang"], row["generation_id"]) == (
        4,
        "helpful",
        "fr",
        "gen-1",
    )
    assert (row["user_id"], row["client_ip"]) == (user_id, "203.0.113.50")


async def test_guest_feedback_has_no_user_id(telemetry: Running, db: asyncpg.Connection) -> None:
    reply = await telemetry.stub.SubmitFeedback(telemetry_pb2.SubmitFeedbackRequest(rating=1))
    row = await db.fetchrow(
        "SELECT user_id, client_ip, generation_id FROM feedback WHERE id = $1",
        uuid.UUID(reply.feedback_id),
    )
    assert row is not None
    assert row["user_id"] is None
    assert row["generation_id"] is None
    assert row["client_ip"] == "127.0.0.1"  # no Envoy header: the peer address


async def test_wishlist_is_idempotent_per_email_whatever_its_case(
    telemetry: Running, db: asyncpg.Connection
) -> None:
    user_id, metadata = user()
    email = f"Pro-{uuid.uuid4().hex[:10]}@Example.com"
    first = await telemetry.stub.JoinWishlist(
        telemetry_pb2.JoinWishlistRequest(email=email, lang="en"), metadata=metadata
    )
    again = await telemetry.stub.JoinWishlist(
        telemetry_pb2.JoinWishlistRequest(email=email.upper(), lang="de")
    )
    assert first.created is True
    assert again.created is False
    rows = await db.fetch(
        "SELECT email, user_id, lang FROM pro_wishlist WHERE lower(email) = lower($1)", email
    )
    assert [tuple(r) for r in rows] == [(email, user_id, "en")]


async def test_events_with_duplicates_and_a_retried_batch_are_stored_once(
    telemetry: Running, db: asyncpg.Connection
) -> None:
    user_id, metadata = user(ip="192.0.2.77")
    props = struct_pb2.Struct()
    props.update({"button": "primary", "step": 2, "flags": [True, None]})
    when = timestamp_pb2.Timestamp()
    when.FromDatetime(datetime.now(UTC) - timedelta(hours=2))
    a = funnel_event(properties=props, occurred_at=when, source="web", lang="en")
    b = funnel_event(event="generate_clicked")
    request = telemetry_pb2.TrackEventsRequest(events=[a, b, a])

    first = await telemetry.stub.TrackEvents(request, metadata=metadata)
    assert (first.accepted, first.duplicates) == (2, 1)
    retried = await telemetry.stub.TrackEvents(request, metadata=metadata)
    assert (retried.accepted, retried.duplicates) == (0, 3)

    rows = await db.fetch(
        "SELECT * FROM funnel_events WHERE event_id = ANY($1::uuid[]) ORDER BY event",
        [a.event_id, b.event_id],
    )
    assert [r["event"] for r in rows] == ["generate_clicked", "page_view"]
    stored = rows[1]
    assert (stored["user_id"], stored["client_ip"], stored["source"], stored["lang"]) == (
        user_id,
        "192.0.2.77",
        "web",
        "en",
    )
    assert json.loads(stored["properties"]) == {
        "button": "primary",
        "step": 2,
        "flags": [True, None],
    }
    assert stored["occurred_at"] == when.ToDatetime(tzinfo=UTC)
    assert json.loads(rows[0]["properties"]) == {}


async def test_an_event_id_is_the_same_event_whatever_its_case(
    telemetry: Running, db: asyncpg.Connection
) -> None:
    event_id = uuid.uuid4()
    upper = funnel_event(event_id=str(event_id).upper())
    lower = funnel_event(event_id=str(event_id))
    first = await telemetry.stub.TrackEvents(
        telemetry_pb2.TrackEventsRequest(events=[upper, lower])
    )
    assert (first.accepted, first.duplicates) == (1, 1)
    retried = await telemetry.stub.TrackEvents(telemetry_pb2.TrackEventsRequest(events=[lower]))
    assert (retried.accepted, retried.duplicates) == (0, 1)
    stored = await db.fetchval("SELECT count(*) FROM funnel_events WHERE event_id = $1", event_id)
    assert stored == 1


async def test_concurrent_requests_are_committed_in_shared_batches(
    telemetry: Running, db: asyncpg.Connection
) -> None:
    stats = telemetry.service.store.events.stats
    shared_before = stats.shared_batches
    requests = [
        telemetry_pb2.TrackEventsRequest(events=[funnel_event(), funnel_event()]) for _ in range(50)
    ]
    replies = await asyncio.gather(*(telemetry.stub.TrackEvents(r) for r in requests))
    assert all((r.accepted, r.duplicates) == (2, 0) for r in replies)
    ids = [e.event_id for r in requests for e in r.events]
    stored = await db.fetchval(
        "SELECT count(*) FROM funnel_events WHERE event_id = ANY($1::uuid[])", ids
    )
    assert stored == 100
    assert stats.shared_batches > shared_before
    assert stats.largest_batch_submissions > 1


async def test_a_security_event_is_stored(telemetry: Running, db: asyncpg.Connection) -> None:
    details = struct_pb2.Struct()
    details.update({"route": "/api/generate", "count": 31})
    ip = f"192.0.2.{uuid.uuid4().int % 250 + 1}"
    reply = await telemetry.stub.RecordSecurityEvent(
        telemetry_pb2.RecordSecurityEventRequest(
            event_type="rate_limit_block",
            severity=telemetry_pb2.SEVERITY_HIGH,
            user_id="user-abuser",
            ip=ip,
            details=details,
        )
    )
    row = await db.fetchrow(
        "SELECT * FROM security_events WHERE id = $1", uuid.UUID(reply.event_id)
    )
    assert row is not None
    assert (row["event_type"], row["severity"], row["user_id"], row["ip"]) == (
        "rate_limit_block",
        "high",
        "user-abuser",
        ip,
    )
    assert json.loads(row["details"]) == {"route": "/api/generate", "count": 31}


# -- bad input -----------------------------------------------------------------------------


async def test_bad_input_names_the_field(telemetry: Running) -> None:
    stub = telemetry.stub
    big = struct_pb2.Struct()
    big.update({"blob": "x" * 5000})
    future = timestamp_pb2.Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(days=3))
    cases: list[tuple[Any, list[str]]] = [
        (stub.SubmitFeedback(telemetry_pb2.SubmitFeedbackRequest(rating=0)), ["rating"]),
        (
            stub.SubmitFeedback(telemetry_pb2.SubmitFeedbackRequest(rating=3, comment="a\x00b")),
            ["comment"],
        ),
        (stub.JoinWishlist(telemetry_pb2.JoinWishlistRequest(email="not-an-email")), ["email"]),
        (
            stub.TrackEvents(
                telemetry_pb2.TrackEventsRequest(
                    events=[telemetry_pb2.FunnelEvent(event_id="nope", event="page_view")]
                )
            ),
            ["events[0].event_id"],
        ),
        (
            stub.TrackEvents(
                telemetry_pb2.TrackEventsRequest(events=[funnel_event() for _ in range(101)])
            ),
            ["events"],
        ),
        (stub.TrackEvents(telemetry_pb2.TrackEventsRequest()), ["events"]),
        (
            stub.TrackEvents(
                telemetry_pb2.TrackEventsRequest(
                    events=[funnel_event(), funnel_event(properties=big)]
                )
            ),
            ["events[1].properties"],
        ),
        (
            stub.TrackEvents(
                telemetry_pb2.TrackEventsRequest(events=[funnel_event(occurred_at=future)])
            ),
            ["events[0].occurred_at"],
        ),
        (
            stub.RecordSecurityEvent(
                telemetry_pb2.RecordSecurityEventRequest(
                    event_type="x", severity=telemetry_pb2.SEVERITY_UNSPECIFIED
                )
            ),
            ["severity"],
        ),
    ]
    for call, fields in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert violated(caught.value) == fields


async def test_a_rejected_request_stores_none_of_its_events(
    telemetry: Running, db: asyncpg.Connection
) -> None:
    good = funnel_event()
    bad = funnel_event(lang="en-" + "x" * 40)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await telemetry.stub.TrackEvents(telemetry_pb2.TrackEventsRequest(events=[good, bad]))
    assert violated(caught.value) == ["events[1].lang"]
    assert (
        await db.fetchval(
            "SELECT count(*) FROM funnel_events WHERE event_id = $1::uuid", good.event_id
        )
        == 0
    )


async def test_a_refused_request_fails_alone_and_the_rest_of_its_batch_commits(
    database_url: str, db: asyncpg.Connection
) -> None:
    # A row that skipped validation (the schema caps lang at 35) is refused by PostgreSQL: the
    # batch is split, the request holding it fails with INVALID_ARGUMENT (nothing of it is
    # written), and the valid request sharing its batch commits. (More in
    # test_store_failures.py and test_group_commit_failures.py.)
    database = Database(PostgresSettings(DATABASE_URL=database_url), PerformanceMonitor())
    store = TelemetryStore(database, BatchLimits(max_wait_seconds=0.05))
    now = datetime.now(UTC)

    def row(lang: str) -> FunnelEventRow:
        return FunnelEventRow(str(uuid.uuid4()), None, "", "page_view", "", lang, "{}", None, now)

    good, bad = row("en"), row("x" * 40)
    try:
        results: Sequence[object] = await asyncio.gather(
            store.track_events([good]), store.track_events([bad]), return_exceptions=True
        )
        assert store.events.stats.shared_batches == 1
        accepted, refused = results
        assert isinstance(refused, ServiceError)
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in refused.violations] == ["events"]
        assert (getattr(accepted, "accepted", None), getattr(accepted, "duplicates", None)) == (
            1,
            0,
        )
        stored = await db.fetch(
            "SELECT event_id FROM funnel_events WHERE event_id = ANY($1::uuid[])",
            [good.event_id, bad.event_id],
        )
        assert [str(r["event_id"]) for r in stored] == [good.event_id]
    finally:
        await store.close()
        await database.close()


async def test_database_down_means_unavailable_with_retry_info_and_unhealthy(
    redis_url: str, redis_prefix: str, dependencies: tuple[HealthServer, HealthServer]
) -> None:
    gen, quota = dependencies
    settings = make_settings(
        f"postgresql://postgres@127.0.0.1:{closed_port()}/nothing",
        redis_url,
        redis_prefix,
        generation_addr=gen.address,
        quota_addr=quota.address,
    )
    async with running(settings) as r:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await r.stub.SubmitFeedback(telemetry_pb2.SubmitFeedbackRequest(rating=5), timeout=20)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        info = error_info_from_call(trailers(caught.value))
        assert isinstance(info, ServiceError)
        assert info.reason is Reason.DEPENDENCY_UNAVAILABLE
        assert info.retry_after_seconds is not None and info.retry_after_seconds > 0
        assert ("retry-after", "2") in trailers(caught.value)

        health = await r.report()
        deps = {d.name: d for d in health.dependencies}
        assert health.status == "unhealthy"
        assert deps["database"].status == "unhealthy"
        public = await r.stub.GetHealth(telemetry_pb2.GetHealthRequest(), timeout=10)
        assert public.status == "unhealthy"
        assert b"postgres" not in public.SerializeToString()


# -- health --------------------------------------------------------------------------------


async def test_health_with_unreachable_services_is_unhealthy_and_answers(
    database_url: str, redis_url: str, redis_prefix: str
) -> None:
    settings = make_settings(
        database_url,
        redis_url,
        redis_prefix,
        generation_addr=f"127.0.0.1:{closed_port()}",
        # A non-routable address: the probe can only end by its timeout (or a quick refusal).
        quota_addr="10.255.255.1:50052",
        health_check_timeout_seconds=0.5,
    )
    async with running(settings) as r:
        health = await r.report(timeout=4.5)
        public = await r.stub.GetHealth(telemetry_pb2.GetHealthRequest(), timeout=4.5)
    deps = {d.name: d for d in health.dependencies}
    assert health.status == "unhealthy"
    assert deps["generation"].status == "unhealthy"
    assert deps["quota"].status == "unhealthy"
    assert deps["database"].status == "healthy"
    assert deps["openai"].status == "unknown"
    # The public answer: the status and when, nothing of what the report says about why.
    assert public.status == "unhealthy"
    assert {f.name for f, _ in public.ListFields()} == {"status", "checked_at"}
    wire = public.SerializeToString()
    for secret in ("10.255.255.1", settings.generation_addr, "quota", "generation"):
        assert secret.encode() not in wire, secret


async def test_health_sees_a_service_come_back(
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    dependencies: tuple[HealthServer, HealthServer],
) -> None:
    _, quota = dependencies
    generation_port = closed_port()
    settings = make_settings(
        database_url,
        redis_url,
        redis_prefix,
        generation_addr=f"127.0.0.1:{generation_port}",
        quota_addr=quota.address,
    )
    async with running(settings) as r:
        health = await r.report()
        generation = {d.name: d for d in health.dependencies}["generation"]
        assert generation.status == "unhealthy"
        assert "UNAVAILABLE" in generation.detail
        async with health_server(GENERATION_SERVICE, generation_port):
            # Eventually (after the channel's short reconnect backoff), not after minutes.
            async with asyncio.timeout(15):
                while True:
                    health = await r.report()
                    if health.status != "unhealthy":
                        break
                    await asyncio.sleep(0.2)
    assert {d.name: d.status for d in health.dependencies}["generation"] == "healthy"


async def test_health_without_redis_is_degraded(
    database_url: str, redis_prefix: str, dependencies: tuple[HealthServer, HealthServer]
) -> None:
    gen, quota = dependencies
    settings = make_settings(
        database_url,
        f"redis://127.0.0.1:{closed_port()}/0",
        redis_prefix,
        generation_addr=gen.address,
        quota_addr=quota.address,
    )
    async with running(settings) as r:
        health = await r.report()
        # Writes do not need Redis.
        reply = await r.stub.SubmitFeedback(telemetry_pb2.SubmitFeedbackRequest(rating=2))
    deps = {d.name: d for d in health.dependencies}
    assert health.status == "degraded"
    assert deps["redis"].status == "unhealthy"
    assert deps["openai"].status == "unknown"
    # Only telemetry's own replica reports, its Redis breaker among its stats.
    assert [(b.service, b.name) for b in health.circuit_breakers] == [("telemetry", "redis")]
    assert any(reason.startswith("redis is failing") for reason in health.reasons)
    assert reply.feedback_id


async def test_the_health_report_needs_the_admin_credential_and_admin_actions_are_stored(
    telemetry: Running, db: asyncpg.Connection
) -> None:
    ip = f"192.0.2.{uuid.uuid4().int % 250 + 1}"
    since = await db.fetchval("SELECT now()")  # other runs may have used this address before
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await telemetry.admin.GetHealthReport(
            telemetry_pb2.GetHealthReportRequest(),
            metadata=(("x-admin-token", "wrong"), ("x-genmesh-client-ip", ip)),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await telemetry.admin.GetHealthReport(telemetry_pb2.GetHealthReportRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await telemetry.admin.GetHealthReport(
        telemetry_pb2.GetHealthReportRequest(),
        metadata=(("x-admin-token", ADMIN_TOKEN), ("x-genmesh-client-ip", ip)),
        timeout=10,
    )
    # Telemetry is the security-event store: its own admin actions go straight to it (best
    # effort, in the background, so eventually). Refusals are counted at the edge instead.
    async with asyncio.timeout(10):
        while True:
            row = await db.fetchrow(
                "SELECT * FROM security_events WHERE ip = $1 AND event_type = 'admin_action'"
                " AND created_at >= $2",
                ip,
                since,
            )
            if row is not None:
                break
            await asyncio.sleep(0.05)
    assert row["severity"] == "low"
    details = json.loads(row["details"])
    assert (details["credential"], details["method"]) == ("token", "GetHealthReport")
    refusals = await db.fetchval(
        "SELECT count(*) FROM security_events WHERE ip = $1 AND event_type = 'admin_auth_failed'"
        " AND created_at >= $2",
        ip,
        since,
    )
    assert refusals == 0


async def test_grpc_health_follows_the_database(telemetry: Running) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{telemetry.service.port}") as channel:
        for name in (
            "genmesh.telemetry.v1.TelemetryService",
            "genmesh.telemetry.v1.TelemetryAdminService",
        ):
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=name)
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
