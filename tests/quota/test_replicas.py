"""Two quota replicas against one Redis and one PostgreSQL, as in production behind a load
balancer: 100 concurrent reserves by one caller with 10 units left grant exactly 10, for a
signed-in user and for a guest, and either replica settles the other's reservations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from genmesh.quota.v1 import quota_pb2
from tests.quota.conftest import (
    RunningQuota,
    SettingsFactory,
    guest_metadata,
    running_quota,
    unique_ip,
    unique_user,
)

pytestmark = pytest.mark.integration

LIMIT = 15
ALREADY_USED = 5  # so exactly 10 are left


@pytest.fixture
async def replicas(quota_settings: SettingsFactory) -> AsyncIterator[list[RunningQuota]]:
    settings = quota_settings(guest_daily_limit=LIMIT, free_daily_limit=LIMIT)
    async with running_quota(settings) as first, running_quota(settings) as second:
        assert first.service.port != second.service.port
        yield [first, second]


async def reserve_100(
    replicas: list[RunningQuota], caller: quota_pb2.Caller
) -> tuple[list[quota_pb2.Reservation], list[grpc.aio.AioRpcError]]:
    request = quota_pb2.ReserveQuotaRequest(caller=caller)
    for i in range(ALREADY_USED):
        await replicas[i % 2].stub.ReserveQuota(request)
    results = await asyncio.gather(
        *(replicas[i % 2].stub.ReserveQuota(request, timeout=20) for i in range(100)),
        return_exceptions=True,
    )
    granted = [r for r in results if isinstance(r, quota_pb2.Reservation)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(granted) + len(refused) == 100, [r for r in results if isinstance(r, Exception)]
    return granted, refused


async def test_a_user_gets_exactly_what_is_left(replicas: list[RunningQuota]) -> None:
    user_id, email = unique_user()
    granted, refused = await reserve_100(
        replicas, quota_pb2.Caller(user_id=user_id, email=email, client_ip=unique_ip())
    )
    assert len(granted) == 10
    assert all(e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    # The other replica settles each reservation (refund): every unit comes back.
    settled = await asyncio.gather(
        *(
            replicas[1 - i % 2].stub.SettleReservation(
                quota_pb2.SettleReservationRequest(
                    reservation_id=r.reservation_id, outcome=quota_pb2.OUTCOME_REFUND
                )
            )
            for i, r in enumerate(granted)
        )
    )
    assert all(s.applied for s in settled)
    assert min(s.quota.used for s in settled) == ALREADY_USED


async def test_a_guest_gets_exactly_what_is_left(replicas: list[RunningQuota]) -> None:
    ip = unique_ip()
    granted, refused = await reserve_100(replicas, quota_pb2.Caller(client_ip=ip))
    assert len(granted) == 10
    assert all(e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    settled = await asyncio.gather(
        *(
            replicas[1 - i % 2].stub.SettleReservation(
                quota_pb2.SettleReservationRequest(
                    reservation_id=r.reservation_id, outcome=quota_pb2.OUTCOME_COMMIT
                )
            )
            for i, r in enumerate(granted)
        )
    )
    assert all(s.applied for s in settled)
    seen = await replicas[0].stub.GetQuota(quota_pb2.GetQuotaRequest(), metadata=guest_metadata(ip))
    assert (seen.used, seen.remaining) == (LIMIT, 0)
