"""The quota service as Envoy and operators see it: the rate limit service
(`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`) over real gRPC, with real
Redis, and the admin API that lists and lifts blocks."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf.message import Message

from genmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from services.common.identity import ADMIN_TOKEN_HEADER, CLIENT_IP_HEADER
from services.quota.ratelimit.config import DEFAULT_CONFIG
from services.quota.ratelimit.rls import SERVICE_NAME, RlsMessages
from tests.quota.conftest import RunningQuota, SettingsFactory, running_quota

ADMIN_TOKEN = "test-admin-token"
MESSAGES = RlsMessages()
OK, OVER_LIMIT = 1, 2
MINUTE = 2  # RateLimitResponse.RateLimit.Unit


@pytest.fixture(scope="module")
def limits_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["routes"]["feedback"].update(per_ip="3/minute", per_user="2/minute")
    raw["escalation"].update(violations=3, blocks=["1m", "10m"])
    path = tmp_path_factory.mktemp("limits") / "limits.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
async def quota(quota_settings: SettingsFactory, limits_file: Path) -> AsyncIterator[RunningQuota]:
    settings = quota_settings(rate_limit_config=limits_file, genmesh_admin_token=ADMIN_TOKEN)
    async with running_quota(settings) as running:
        yield running


def rls_request(*descriptors: dict[str, str]) -> Message:
    request: Any = MESSAGES.request()
    request.domain = "genmesh"
    for entries in descriptors:
        descriptor = request.descriptors.add()
        for key, value in entries.items():
            entry = descriptor.entries.add()
            entry.key, entry.value = key, value
    message: Message = request
    return message


async def should_rate_limit(quota: RunningQuota, *descriptors: dict[str, str]) -> Any:
    call = quota.channel.unary_unary(
        f"/{SERVICE_NAME}/ShouldRateLimit",
        request_serializer=MESSAGES.request.SerializeToString,
        response_deserializer=MESSAGES.response.FromString,
    )
    return await call(rls_request(*descriptors), timeout=5)


def fresh_ip() -> str:
    return f"203.0.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"


def admin(ip: str = "192.0.2.250", token: str = ADMIN_TOKEN) -> tuple[tuple[str, str], ...]:
    return ((ADMIN_TOKEN_HEADER, token), (CLIENT_IP_HEADER, ip))


async def test_allowed_answers_carry_the_limit_for_the_x_ratelimit_headers(
    quota: RunningQuota,
) -> None:
    ip = fresh_ip()
    response = await should_rate_limit(
        quota,
        {"path": "/api/feedback", "remote_address": ip},
        {"path": "/api/feedback", "user": "u-rls-1"},
    )
    assert response.overall_code == OK
    ip_status, user_status = response.statuses
    assert ip_status.code == OK and ip_status.limit_remaining == 2
    assert ip_status.current_limit.name == "feedback.per_ip"
    assert ip_status.current_limit.requests_per_unit == 3
    assert ip_status.current_limit.unit == MINUTE
    assert ip_status.duration_until_reset.seconds == 20  # whole again after one interval
    assert user_status.current_limit.name == "feedback.per_user"
    assert user_status.limit_remaining == 1
    assert not response.raw_body and not response.response_headers_to_add


async def test_over_the_limit_the_answer_is_a_429_body_and_a_retry_after(
    quota: RunningQuota,
) -> None:
    ip = fresh_ip()
    for _ in range(3):
        await should_rate_limit(quota, {"path": "/api/feedback", "remote_address": ip})
    response = await should_rate_limit(quota, {"path": "/api/feedback", "remote_address": ip})
    assert response.overall_code == OVER_LIMIT
    (status,) = response.statuses
    assert status.code == OVER_LIMIT and status.limit_remaining == 0
    # One request comes back every 20 s, less the time these calls took.
    assert 15 <= status.duration_until_reset.seconds <= 20
    headers = {h.key: h.value for h in response.response_headers_to_add}
    assert list(headers) == ["retry-after"]
    assert int(headers["retry-after"]) == status.duration_until_reset.seconds
    body = json.loads(response.raw_body)
    assert body["code"] == 8
    assert body["details"][0]["reason"] == "RATE_LIMITED"
    assert body["details"][0]["metadata"]["limit"] == "feedback"


async def test_a_request_envoy_describes_oddly_is_allowed(quota: RunningQuota) -> None:
    response = await should_rate_limit(quota, {"generic_key": "anything"})
    assert response.overall_code == OK
    assert not response.statuses[0].HasField("current_limit")


async def test_operators_list_and_lift_blocks(quota: RunningQuota) -> None:
    ip = fresh_ip()
    for _ in range(6):  # 3 allowed, then 3 refusals: a block
        await should_rate_limit(quota, {"path": "/api/feedback", "remote_address": ip})
    blocked = await should_rate_limit(quota, {"path": "/api/quota", "remote_address": ip})
    assert blocked.overall_code == OVER_LIMIT

    stub = quota_pb2_grpc.QuotaAdminServiceStub(quota.channel)
    listed = await stub.ListBlocks(quota_pb2.ListBlocksRequest(), metadata=admin())
    mine = [b for b in listed.blocks if b.subject == ip]
    assert len(mine) == 1
    assert (mine[0].scope, mine[0].level, mine[0].backend) == ("ip", 1, "redis")
    assert 50 < mine[0].remaining_seconds <= 60
    assert mine[0].blocked_until.seconds > 0

    lifted = await stub.LiftBlock(
        quota_pb2.LiftBlockRequest(scope="ip", subject=ip), metadata=admin()
    )
    assert lifted.lifted
    again = await stub.LiftBlock(
        quota_pb2.LiftBlockRequest(scope="ip", subject=ip), metadata=admin()
    )
    assert not again.lifted
    after = await should_rate_limit(quota, {"path": "/api/quota", "remote_address": ip})
    assert after.overall_code == OK
    listed = await stub.ListBlocks(quota_pb2.ListBlocksRequest(), metadata=admin())
    assert ip not in {b.subject for b in listed.blocks}


async def test_the_block_admin_needs_the_admin_credential(quota: RunningQuota) -> None:
    stub = quota_pb2_grpc.QuotaAdminServiceStub(quota.channel)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.ListBlocks(
            quota_pb2.ListBlocksRequest(), metadata=((CLIENT_IP_HEADER, "1.2.3.4"),)
        )
    assert missing.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await stub.LiftBlock(
            quota_pb2.LiftBlockRequest(scope="ip", subject="1.2.3.4"), metadata=admin(token="x")
        )
    assert wrong.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_lifting_names_bad_input(quota: RunningQuota) -> None:
    stub = quota_pb2_grpc.QuotaAdminServiceStub(quota.channel)
    for request, field in (
        (quota_pb2.LiftBlockRequest(scope="planet", subject="earth"), "scope"),
        (quota_pb2.LiftBlockRequest(scope="ip", subject=""), "subject"),
        (quota_pb2.LiftBlockRequest(scope="ip", subject="not-an-ip"), "subject"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.LiftBlock(request, metadata=admin())
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert field in (caught.value.details() or "")


async def test_an_ipv6_block_is_lifted_by_any_address_of_its_network(quota: RunningQuota) -> None:
    network = f"2001:db8:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}"
    for host in range(6):
        await should_rate_limit(
            quota, {"path": "/api/feedback", "remote_address": f"{network}::{host + 1}"}
        )
    stub = quota_pb2_grpc.QuotaAdminServiceStub(quota.channel)
    listed = await stub.ListBlocks(quota_pb2.ListBlocksRequest(), metadata=admin())
    # Listed in canonical form (a group like 0e13 is written e13).
    assert str(ipaddress.ip_network(f"{network}::/64")) in {b.subject for b in listed.blocks}
    lifted = await stub.LiftBlock(
        quota_pb2.LiftBlockRequest(scope="ip", subject=f"{network}::abcd"), metadata=admin()
    )
    assert lifted.lifted


def test_a_bad_rate_limit_file_stops_the_service_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "limits.yaml"
    bad.write_text("version: 1\nroutes: {generate: {per_ip: lots}}\n")
    env = {
        **os.environ,
        "RATE_LIMIT_CONFIG": str(bad),
        "GRPC_PORT": "0",
        "METRICS_PORT": "0",
        "REDIS_URL": "",
    }
    result = subprocess.run(
        [sys.executable, "-m", "services.quota"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("quota: ")
    assert "limits.yaml" in last and "per_ip" in last and "Traceback" not in result.stderr
