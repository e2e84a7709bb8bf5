"""The quota service over real gRPC, on real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from genmesh.quota.v1 import quota_pb2
from services.common.errors import Reason, ServiceError, error_info_from_call
from services.quota.clock import QuotaClock
from tests.quota.conftest import (
    FREE_LIMIT,
    GUEST_LIMIT,
    PRO_LIMIT,
    MovableNow,
    RunningQuota,
    SettingsFactory,
    before_a_future_midnight,
    guest_metadata,
    running_quota,
    unique_ip,
    unique_user,
    user_metadata,
)

pytestmark = pytest.mark.integration
TIMEOUT = 10  # seconds: a deadline on every call, so a hang fails instead of stalling


def guest(ip: str) -> quota_pb2.ReserveQuotaRequest:
    return quota_pb2.ReserveQuotaRequest(caller=quota_pb2.Caller(client_ip=ip))


def user(user_id: str, email: str = "") -> quota_pb2.ReserveQuotaRequest:
    return quota_pb2.ReserveQuotaRequest(
        caller=quota_pb2.Caller(user_id=user_id, email=email, client_ip=unique_ip())
    )


def settle(rid: str, outcome: int) -> quota_pb2.SettleReservationRequest:
    return quota_pb2.SettleReservationRequest(reservation_id=rid, outcome=outcome)  # type: ignore[arg-type]


async def failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


def trailers(err: grpc.aio.AioRpcError) -> list[tuple[str, str | bytes]]:
    # grpc.aio.Metadata iterates as (key, value) pairs; its stubs call it a Mapping.
    metadata: Any = err.trailing_metadata() or ()
    return [(str(k), v) for k, v in metadata]


def service_error(err: grpc.aio.AioRpcError) -> ServiceError:
    rebuilt = error_info_from_call(trailers(err))
    assert rebuilt is not None, err
    return rebuilt


def assert_exhausted(err: grpc.aio.AioRpcError, limit: int, plan: str) -> ServiceError:
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    rebuilt = service_error(err)
    assert rebuilt.reason is Reason.QUOTA_EXHAUSTED
    assert rebuilt.metadata["limit"] == str(limit)
    assert rebuilt.metadata["plan"] == plan
    assert f"daily quota of {limit} generations used" in rebuilt.message
    resets_at = datetime.fromisoformat(rebuilt.metadata["resets_at"].replace("Z", "+00:00"))
    assert rebuilt.retry_after_seconds is not None
    # The delay is the real time left until the reset, not a constant.
    left = (resets_at - datetime.now(UTC)).total_seconds()
    assert abs(rebuilt.retry_after_seconds - left) < 60
    # The standard way to read it too: google.rpc.Status with a RetryInfo detail.
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    kinds = {d.type_url.rsplit("/", 1)[-1] for d in status.details}
    assert {"google.rpc.ErrorInfo", "google.rpc.RetryInfo"} <= kinds
    retry_after = dict(trailers(err)).get("retry-after")
    assert retry_after is not None and int(retry_after) >= 1
    return rebuilt


# -- guests --------------------------------------------------------------------------------------


async def test_guest_reserves_until_exhausted(quota: RunningQuota) -> None:
    ip = unique_ip()
    for n in range(1, GUEST_LIMIT + 1):
        reservation = await quota.stub.ReserveQuota(guest(ip), timeout=TIMEOUT)
        assert reservation.reservation_id.startswith("g_")
        assert (reservation.quota.plan, reservation.quota.used) == ("guest", n)
        assert reservation.quota.remaining == GUEST_LIMIT - n
    err = await failure(quota.stub.ReserveQuota(guest(ip), timeout=TIMEOUT))
    assert_exhausted(err, GUEST_LIMIT, "guest")

    seen = await quota.stub.GetQuota(
        quota_pb2.GetQuotaRequest(), metadata=guest_metadata(ip), timeout=TIMEOUT
    )
    assert (seen.plan, seen.limit, seen.used, seen.remaining) == ("guest", GUEST_LIMIT, 3, 0)
    window = QuotaClock().window()
    assert seen.resets_at.ToDatetime(tzinfo=UTC) == window.resets_at


async def test_guest_refund_gives_the_unit_back_exactly_once(quota: RunningQuota) -> None:
    ip = unique_ip()
    rids = [(await quota.stub.ReserveQuota(guest(ip))).reservation_id for _ in range(GUEST_LIMIT)]
    first = await quota.stub.SettleReservation(settle(rids[0], quota_pb2.OUTCOME_REFUND))
    again = await quota.stub.SettleReservation(settle(rids[0], quota_pb2.OUTCOME_REFUND))
    assert first.applied and first.quota.used == GUEST_LIMIT - 1
    assert not again.applied and again.quota.used == GUEST_LIMIT - 1
    # Exactly one unit came back: one more reservation, then exhausted again.
    await quota.stub.ReserveQuota(guest(ip))
    err = await failure(quota.stub.ReserveQuota(guest(ip)))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_guest_commit_then_refund_is_not_applied(quota: RunningQuota) -> None:
    ip = unique_ip()
    rid = (await quota.stub.ReserveQuota(guest(ip))).reservation_id
    committed = await quota.stub.SettleReservation(settle(rid, quota_pb2.OUTCOME_COMMIT))
    refunded = await quota.stub.SettleReservation(settle(rid, quota_pb2.OUTCOME_REFUND))
    assert committed.applied and committed.quota.used == 1
    assert not refunded.applied and refunded.quota.used == 1


async def test_unknown_reservations_are_not_applied(quota: RunningQuota) -> None:
    for rid in ("g_" + "0" * 16 + "_" + "0" * 32, "u_00000000-0000-0000-0000-000000000000"):
        response = await quota.stub.SettleReservation(settle(rid, quota_pb2.OUTCOME_REFUND))
        assert not response.applied
        assert not response.HasField("quota")


async def test_concurrent_guest_reserves_stay_exact(quota: RunningQuota) -> None:
    ip = unique_ip()
    results = await asyncio.gather(
        *(quota.stub.ReserveQuota(guest(ip), timeout=TIMEOUT) for _ in range(30)),
        return_exceptions=True,
    )
    granted = [r for r in results if isinstance(r, quota_pb2.Reservation)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(granted) == GUEST_LIMIT
    assert len(refused) == 30 - GUEST_LIMIT
    assert all(e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    assert len({r.reservation_id for r in granted}) == GUEST_LIMIT


async def test_guest_ip_spellings_share_one_counter(quota: RunningQuota) -> None:
    h = unique_ip().split(":")
    v4 = f"198.51.{int(h[2], 16) % 256}.{int(h[3], 16) % 256}"
    await quota.stub.ReserveQuota(guest(v4))
    seen = await quota.stub.GetQuota(
        quota_pb2.GetQuotaRequest(), metadata=guest_metadata("::ffff:" + v4)
    )
    assert seen.used == 1


async def test_one_ipv6_network_is_one_guest(quota: RunningQuota) -> None:
    """Every address of a /64 is one subscriber: choosing a fresh address per request does not
    make a fresh guest."""
    network = ":".join(unique_ip().split(":")[:4])
    for host in range(GUEST_LIMIT):
        await quota.stub.ReserveQuota(guest(f"{network}::{host + 1}"))
    with pytest.raises(grpc.aio.AioRpcError) as exhausted:
        await quota.stub.ReserveQuota(guest(f"{network}:ffff:ffff:ffff:ffff"))
    assert exhausted.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    seen = await quota.stub.GetQuota(
        quota_pb2.GetQuotaRequest(), metadata=guest_metadata(f"{network}::abcd")
    )
    assert seen.used == GUEST_LIMIT
    neighbour = ":".join(unique_ip().split(":")[:4])
    assert (await quota.stub.ReserveQuota(guest(f"{neighbour}::1"))).quota.used == 1


# -- users ---------------------------------------------------------------------------------------


async def test_concurrent_user_reserves_stay_exact(
    quota: RunningQuota, db: asyncpg.Connection
) -> None:
    user_id, email = unique_user()
    results = await asyncio.gather(
        *(quota.stub.ReserveQuota(user(user_id, email), timeout=TIMEOUT) for _ in range(30)),
        return_exceptions=True,
    )
    granted = [r for r in results if isinstance(r, quota_pb2.Reservation)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(granted) == FREE_LIMIT
    assert len(refused) == 30 - FREE_LIMIT
    for err in refused:
        assert service_error(err).reason is Reason.QUOTA_EXHAUSTED
    assert sorted(r.quota.used for r in granted) == list(range(1, FREE_LIMIT + 1))
    assert await db.fetchval("SELECT daily_used FROM profiles WHERE user_id = $1", user_id) == 10


async def test_user_refund_once_and_commit_then_refund(
    quota: RunningQuota, db: asyncpg.Connection
) -> None:
    user_id, email = unique_user()
    refunded = await quota.stub.ReserveQuota(user(user_id, email))
    committed = await quota.stub.ReserveQuota(user(user_id, email))
    assert refunded.reservation_id.startswith("u_")
    assert (refunded.quota.plan, committed.quota.used) == ("free", 2)

    first = await quota.stub.SettleReservation(
        settle(refunded.reservation_id, quota_pb2.OUTCOME_REFUND)
    )
    again = await quota.stub.SettleReservation(
        settle(refunded.reservation_id, quota_pb2.OUTCOME_REFUND)
    )
    assert first.applied and first.quota.used == 1
    assert not again.applied and again.quota.used == 1

    commit = await quota.stub.SettleReservation(
        settle(committed.reservation_id, quota_pb2.OUTCOME_COMMIT)
    )
    late = await quota.stub.SettleReservation(
        settle(committed.reservation_id, quota_pb2.OUTCOME_REFUND)
    )
    assert commit.applied and not late.applied and late.quota.used == 1
    states = await db.fetch(
        "SELECT state FROM quota_reservations WHERE user_id = $1 ORDER BY state", user_id
    )
    assert [r["state"] for r in states] == ["committed", "refunded"]


async def test_user_reads_are_exact_right_after_a_generation(quota: RunningQuota) -> None:
    user_id, email = unique_user()
    md = user_metadata(user_id, email)
    before = await quota.stub.GetQuota(quota_pb2.GetQuotaRequest(), metadata=md)
    cached = await quota.stub.GetQuota(quota_pb2.GetQuotaRequest(), metadata=md)
    assert before.used == cached.used == 0
    rid = (await quota.stub.ReserveQuota(user(user_id, email))).reservation_id
    after = await quota.stub.GetQuota(quota_pb2.GetQuotaRequest(), metadata=md)
    assert (after.plan, after.limit, after.used, after.remaining) == ("free", FREE_LIMIT, 1, 9)
    await quota.stub.SettleReservation(settle(rid, quota_pb2.OUTCOME_REFUND))
    profile = await quota.stub.GetProfile(quota_pb2.GetProfileRequest(), metadata=md)
    assert profile.quota.used == 0


async def test_get_profile_creates_the_profile(quota: RunningQuota, db: asyncpg.Connection) -> None:
    user_id, email = unique_user()
    md = user_metadata(user_id, email)
    profile = await quota.stub.GetProfile(quota_pb2.GetProfileRequest(), metadata=md)
    assert (profile.user_id, profile.email, profile.is_pro, profile.plan) == (
        user_id,
        email,
        False,
        "free",
    )
    assert (profile.quota.limit, profile.quota.used, profile.quota.plan) == (FREE_LIMIT, 0, "free")
    assert profile.created_at.seconds > 0 and profile.last_reset_time.seconds > 0
    row = await db.fetchrow("SELECT email, is_pro FROM profiles WHERE user_id = $1", user_id)
    assert row is not None and row["email"] == email and not row["is_pro"]

    # A changed email is stored on the next sight.
    changed = await quota.stub.GetProfile(
        quota_pb2.GetProfileRequest(), metadata=user_metadata(user_id, "new-" + email)
    )
    assert changed.email == "new-" + email
    assert await db.fetchval("SELECT email FROM profiles WHERE user_id = $1", user_id) == (
        "new-" + email
    )


async def test_get_profile_for_a_guest_is_unauthenticated(quota: RunningQuota) -> None:
    err = await failure(
        quota.stub.GetProfile(quota_pb2.GetProfileRequest(), metadata=guest_metadata(unique_ip()))
    )
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    rebuilt = service_error(err)
    assert rebuilt.reason is Reason.UNAUTHENTICATED
    assert rebuilt.message == "sign in to see your profile"


async def test_a_pro_user_gets_the_pro_limit(quota: RunningQuota, db: asyncpg.Connection) -> None:
    user_id, email = unique_user()
    await db.execute(
        "INSERT INTO profiles (user_id, email, is_pro) VALUES ($1, $2, true)", user_id, email
    )
    md = user_metadata(user_id, email)
    seen = await quota.stub.GetQuota(quota_pb2.GetQuotaRequest(), metadata=md)
    assert (seen.plan, seen.limit, seen.remaining) == ("pro", PRO_LIMIT, PRO_LIMIT)
    for _ in range(PRO_LIMIT):
        await quota.stub.ReserveQuota(user(user_id, email))
    err = await failure(quota.stub.ReserveQuota(user(user_id, email)))
    assert_exhausted(err, PRO_LIMIT, "pro")
    profile = await quota.stub.GetProfile(quota_pb2.GetProfileRequest(), metadata=md)
    assert (profile.is_pro, profile.plan, profile.quota.remaining) == (True, "pro", 0)


async def test_free_user_exhausted_error(quota: RunningQuota) -> None:
    user_id, email = unique_user()
    for _ in range(FREE_LIMIT):
        await quota.stub.ReserveQuota(user(user_id, email))
    err = await failure(quota.stub.ReserveQuota(user(user_id, email)))
    assert_exhausted(err, FREE_LIMIT, "free")


# -- consuming at once (an answer already in hand) --------------------------------------------


def consuming(request: quota_pb2.ReserveQuotaRequest) -> quota_pb2.ReserveQuotaRequest:
    request.consume = True
    return request


async def test_guest_consume_is_committed_at_once_and_exhausts_like_reserve(
    quota: RunningQuota,
) -> None:
    ip = unique_ip()
    taken = [await quota.stub.ReserveQuota(consuming(guest(ip))) for _ in range(GUEST_LIMIT)]
    assert [t.quota.used for t in taken] == list(range(1, GUEST_LIMIT + 1))
    assert taken[0].reservation_id.startswith("g_")
    assert_exhausted(
        await failure(quota.stub.ReserveQuota(consuming(guest(ip)))), GUEST_LIMIT, "guest"
    )
    # Already committed: settling it is a harmless no-op, a refund gives nothing back.
    for outcome in (quota_pb2.OUTCOME_REFUND, quota_pb2.OUTCOME_COMMIT):
        late = await quota.stub.SettleReservation(settle(taken[0].reservation_id, outcome))
        assert not late.applied and late.quota.used == GUEST_LIMIT


async def test_user_consume_is_one_committed_row_and_exhausts_like_reserve(
    quota: RunningQuota, db: asyncpg.Connection
) -> None:
    user_id, email = unique_user()
    pending = await quota.stub.ReserveQuota(user(user_id, email))
    consumed = await quota.stub.ReserveQuota(consuming(user(user_id, email)))
    assert consumed.reservation_id.startswith("u_")
    assert (consumed.quota.plan, consumed.quota.used) == ("free", 2)
    rows = await db.fetch(
        "SELECT reservation_id::text AS id, state, settled_at IS NOT NULL AS settled"
        " FROM quota_reservations WHERE user_id = $1",
        user_id,
    )
    states = {row["id"]: (row["state"], row["settled"]) for row in rows}
    assert states == {
        pending.reservation_id.removeprefix("u_"): ("reserved", False),
        consumed.reservation_id.removeprefix("u_"): ("committed", True),
    }
    late = await quota.stub.SettleReservation(
        settle(consumed.reservation_id, quota_pb2.OUTCOME_REFUND)
    )
    assert not late.applied and late.quota.used == 2
    for _ in range(FREE_LIMIT - 2):
        await quota.stub.ReserveQuota(consuming(user(user_id, email)))
    err = await failure(quota.stub.ReserveQuota(consuming(user(user_id, email))))
    assert_exhausted(err, FREE_LIMIT, "free")


# -- validation and health -----------------------------------------------------------------------


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    assert service_error(err).reason is Reason.INVALID_ARGUMENT
    return found


async def test_empty_caller_is_invalid(quota: RunningQuota) -> None:
    err = await failure(
        quota.stub.ReserveQuota(quota_pb2.ReserveQuotaRequest(caller=quota_pb2.Caller()))
    )
    found = violations(err)
    assert "user_id or client_ip is required" in found.values()


async def test_missing_caller_and_bad_settlements_are_invalid(quota: RunningQuota) -> None:
    assert "caller" in violations(
        await failure(quota.stub.ReserveQuota(quota_pb2.ReserveQuotaRequest()))
    )
    bad_ip = quota_pb2.ReserveQuotaRequest(caller=quota_pb2.Caller(client_ip="not an ip"))
    assert "caller.client_ip" in violations(await failure(quota.stub.ReserveQuota(bad_ip)))
    empty = violations(
        await failure(quota.stub.SettleReservation(quota_pb2.SettleReservationRequest()))
    )
    assert {"reservation_id", "outcome"} <= set(empty)
    foreign = violations(
        await failure(quota.stub.SettleReservation(settle("nope", quota_pb2.OUTCOME_COMMIT)))
    )
    assert "reservation_id" in foreign


async def test_health_is_serving(quota: RunningQuota) -> None:
    health = health_pb2_grpc.HealthStub(quota.channel)
    for service in ("", "genmesh.quota.v1.QuotaService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- the day rolls over ----------------------------------------------------------------------------


async def test_day_rollover_resets_guests_and_users(quota_settings: SettingsFactory) -> None:
    now = MovableNow()
    clock = QuotaClock("America/New_York", now=now)
    now.set(before_a_future_midnight(clock, seconds=60))
    settings = quota_settings(quota_timezone="America/New_York")
    async with running_quota(settings, clock=clock) as quota:
        ip = unique_ip()
        user_id, email = unique_user()
        md = user_metadata(user_id, email)
        guest_rids = [
            (await quota.stub.ReserveQuota(guest(ip))).reservation_id for _ in range(GUEST_LIMIT)
        ]
        user_rids = [
            (await quota.stub.ReserveQuota(user(user_id, email))).reservation_id
            for _ in range(FREE_LIMIT)
        ]
        assert (await failure(quota.stub.ReserveQuota(guest(ip)))).code() is (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        exhausted = service_error(await failure(quota.stub.ReserveQuota(user(user_id, email))))
        assert exhausted.retry_after_seconds is not None
        assert 0 < exhausted.retry_after_seconds <= 60
        yesterday = await quota.stub.GetQuota(quota_pb2.GetQuotaRequest(), metadata=md)
        assert yesterday.used == FREE_LIMIT

        now.advance(timedelta(minutes=2))  # past local midnight
        window = clock.window()
        today = await quota.stub.GetQuota(quota_pb2.GetQuotaRequest(), metadata=md)
        assert (today.used, today.remaining) == (0, FREE_LIMIT)
        assert today.resets_at.ToDatetime(tzinfo=UTC) == window.resets_at
        guest_today = await quota.stub.GetQuota(
            quota_pb2.GetQuotaRequest(), metadata=guest_metadata(ip)
        )
        assert guest_today.used == 0

        assert (await quota.stub.ReserveQuota(guest(ip))).quota.used == 1
        assert (await quota.stub.ReserveQuota(user(user_id, email))).quota.used == 1
        profile = await quota.stub.GetProfile(quota_pb2.GetProfileRequest(), metadata=md)
        assert profile.last_reset_time.ToDatetime(tzinfo=UTC) >= window.starts_at

        # Yesterday's refunds settle but give back none of today's units.
        late_user = await quota.stub.SettleReservation(
            settle(user_rids[0], quota_pb2.OUTCOME_REFUND)
        )
        late_guest = await quota.stub.SettleReservation(
            settle(guest_rids[0], quota_pb2.OUTCOME_REFUND)
        )
        assert late_user.quota.used == 1 and late_guest.quota.used == 1


# -- Redis down ----------------------------------------------------------------------------------


async def test_quota_keeps_working_when_redis_is_unreachable(
    quota_settings: SettingsFactory,
) -> None:
    settings = quota_settings(redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.2)
    async with running_quota(settings) as quota:
        async with asyncio.timeout(30):  # no request may hang on the dead Redis
            ip = unique_ip()
            rids = [
                (await quota.stub.ReserveQuota(guest(ip), timeout=TIMEOUT)).reservation_id
                for _ in range(GUEST_LIMIT)
            ]
            err = await failure(quota.stub.ReserveQuota(guest(ip), timeout=TIMEOUT))
            assert_exhausted(err, GUEST_LIMIT, "guest")
            refund = await quota.stub.SettleReservation(
                settle(rids[0], quota_pb2.OUTCOME_REFUND), timeout=TIMEOUT
            )
            assert refund.applied and refund.quota.used == GUEST_LIMIT - 1
            seen = await quota.stub.GetQuota(
                quota_pb2.GetQuotaRequest(), metadata=guest_metadata(ip), timeout=TIMEOUT
            )
            assert seen.used == GUEST_LIMIT - 1

            # Users live in PostgreSQL; reads skip the (Redis) cache and stay exact.
            user_id, email = unique_user()
            md = user_metadata(user_id, email)
            await quota.stub.GetQuota(quota_pb2.GetQuotaRequest(), metadata=md, timeout=TIMEOUT)
            await quota.stub.ReserveQuota(user(user_id, email), timeout=TIMEOUT)
            seen = await quota.stub.GetQuota(
                quota_pb2.GetQuotaRequest(), metadata=md, timeout=TIMEOUT
            )
            assert seen.used == 1

            # Redis is optional: still SERVING, with Redis reported as down.
            statuses = {s.name: s for s in await quota.service.refresh_health()}
            assert statuses["postgres"].ok and not statuses["redis"].ok
            health = health_pb2_grpc.HealthStub(quota.channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
