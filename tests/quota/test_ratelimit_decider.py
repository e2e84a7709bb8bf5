"""The rate-limit decision for a request (descriptors in, verdict and refusal out) and the
security events abuse produces, on the memory limiter (the semantics are the limiter tests';
the decision against a Redis that hangs is in test_ratelimit_limiter.py)."""

from __future__ import annotations

import json
import uuid

from genmesh.telemetry.v1 import telemetry_pb2
from services.common.client_networks import ClientNetworks
from services.quota.ratelimit.config import RateLimitConfig, load_config
from services.quota.ratelimit.decider import RateLimitDecider
from services.quota.ratelimit.limiter import Verdict
from services.quota.ratelimit.memory_limiter import MemoryLimiter
from tests.security_events import RecordedEvents


def config(**env: str) -> RateLimitConfig:
    return load_config(
        env={
            "RATE_LIMIT_FEEDBACK_PER_IP": "3/minute",
            "RATE_LIMIT_FEEDBACK_PER_USER": "2/minute",
            "RATE_LIMIT_BLOCK_AFTER": "3",
            "RATE_LIMIT_BLOCK_STEPS": "1m,10m",
            **env,
        }
    )


def decider(events: RecordedEvents | None = None, **env: str) -> RateLimitDecider:
    return RateLimitDecider(config(**env), MemoryLimiter(), ClientNetworks(), events)


def guest(path: str, ip: str) -> list[dict[str, str]]:
    return [{"path": path, "remote_address": ip}]


def user(path: str, ip: str, user_id: str) -> list[dict[str, str]]:
    return [{"path": path, "remote_address": ip}, {"path": path, "user": user_id}]


def fresh_ip() -> str:
    return f"2001:db8:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}::1"


async def test_allowed_requests_carry_a_status_per_descriptor() -> None:
    rl = decider()
    decision = await rl.decide(user("/api/feedback", fresh_ip(), "u-1"))
    assert not decision.over_limit
    ip_status, user_status = decision.statuses
    assert ip_status.name == "feedback.per_ip" and str(ip_status.limit) == "3/minute"
    assert user_status.name == "feedback.per_user" and str(user_status.limit) == "2/minute"
    assert ip_status.result is not None and ip_status.result.remaining == 2
    assert user_status.result is not None and user_status.result.remaining == 1


async def test_the_user_limit_holds_across_networks_and_the_refusal_names_it() -> None:
    rl = decider()
    for _ in range(2):
        assert not (await rl.decide(user("/api/feedback", fresh_ip(), "u-2"))).over_limit
    refused = await rl.decide(user("/api/feedback", fresh_ip(), "u-2"))
    assert refused.over_limit and refused.refusal is not None
    body = json.loads(refused.refusal.to_json())
    assert body["code"] == 8
    info, retry = body["details"]
    assert info["reason"] == "RATE_LIMITED"  # never QUOTA_EXHAUSTED
    assert info["metadata"] == {"limit": "feedback", "scope": "user", "policy": "2/minute"}
    assert "2 feedback requests per minute per user" in body["message"]
    assert 25 < float(retry["retry_delay"].rstrip("s")) <= 30


async def test_one_ipv6_network_is_one_caller() -> None:
    rl = decider()
    network = f"2001:db8:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}"
    for host in range(3):
        assert not (await rl.decide(guest("/api/feedback", f"{network}::{host + 1}"))).over_limit
    assert (await rl.decide(guest("/api/feedback", f"{network}:ffff::9"))).over_limit
    assert not (await rl.decide(guest("/api/feedback", fresh_ip()))).over_limit


async def test_routes_have_their_own_limits_and_unknown_descriptors_count_nothing() -> None:
    rl = decider()
    ip = fresh_ip()
    for _ in range(3):
        await rl.decide(guest("/api/feedback", ip))
    assert (await rl.decide(guest("/api/feedback", ip))).over_limit
    assert not (await rl.decide(guest("/api/wishlist", ip))).over_limit
    stray = await rl.decide([{"path": "/api/feedback"}, {"generic_key": "x"}])
    assert not stray.over_limit
    assert [s.result for s in stray.statuses] == [None, None]
    not_an_ip = await rl.decide(guest("/api/feedback", "unix:/socket"))
    assert not not_an_ip.over_limit and not_an_ip.statuses[0].result is None


async def test_off_means_no_limit() -> None:
    rl = decider(RATE_LIMIT_FEEDBACK_PER_IP="off")
    ip = fresh_ip()
    for _ in range(10):
        decision = await rl.decide(guest("/api/feedback", ip))
        assert not decision.over_limit and decision.statuses[0].limit is None
        assert decision.statuses[0].result is None  # nothing counted, nothing to report


async def test_a_blocked_caller_is_refused_on_routes_without_a_limit() -> None:
    """`off` turns a route's limit off, not the block: a blocked network or user gets 429
    with the block's remaining time there too."""
    events = RecordedEvents()
    rl = decider(
        events,
        RATE_LIMIT_BLOCK_AFTER="1",
        RATE_LIMIT_EVENTS_PER_IP="off",
        RATE_LIMIT_EVENTS_PER_USER="off",
        RATE_LIMIT_DEFAULT_PER_IP="off",
    )
    ip = fresh_ip()
    assert not (await rl.decide(guest("/api/events", ip))).over_limit  # not blocked yet
    for _ in range(4):  # the allowance (3), then one refusal: a block
        await rl.decide(guest("/api/feedback", ip))
    assert events.types() == ["rate_limit_block"]
    for path in ("/api/events", "/api/health"):
        refused = await rl.decide(guest(path, ip))
        assert refused.over_limit and refused.refusal is not None, path
        (status,) = refused.statuses
        assert status.limit is None
        assert status.result is not None and status.result.verdict is Verdict.BLOCKED
        assert refused.refusal.metadata["limit"] == "block"
        assert refused.refusal.metadata["block_level"] == "1"
        assert 55 < (refused.refusal.retry_after_seconds or 0) <= 60
    # A signed-in user on that network: its IP descriptor is still the blocked network's.
    as_user = await rl.decide(user("/api/events", ip, "u-on-a-blocked-network"))
    assert as_user.over_limit and as_user.refusal is not None
    assert as_user.refusal.metadata["scope"] == "ip"

    # A blocked user, from a network nobody blocked, on a route without a per-user limit.
    for _ in range(3):  # the user's allowance (2), then one refusal: a block
        await rl.decide(user("/api/feedback", fresh_ip(), "u-blocked-off"))
    refused = await rl.decide(user("/api/events", fresh_ip(), "u-blocked-off"))
    assert refused.refusal is not None and refused.refusal.metadata["scope"] == "user"
    assert "user is blocked" in refused.refusal.message
    assert len(events.events) == 2  # the two blocks; refusals during a block add no rows
    # Nobody else is refused there.
    assert not (await rl.decide(user("/api/events", fresh_ip(), "u-other"))).over_limit


async def test_one_event_per_burst_and_one_per_block_not_one_per_request() -> None:
    events = RecordedEvents()
    rl = decider(events, RATE_LIMIT_BLOCK_AFTER="4")
    ip = fresh_ip()
    for _ in range(3):
        await rl.decide(guest("/api/feedback", ip))
    assert events.types() == []
    for _ in range(3):
        await rl.decide(guest("/api/feedback", ip))  # refusals 1-3: one burst
    assert events.types() == ["rate_limit_exceeded"]
    first = events.events[0]
    severity, identity, details = first.severity, first.identity, first.details
    assert severity == telemetry_pb2.SEVERITY_MEDIUM
    assert identity.client_ip == ip and identity.user_id == ""
    assert details["route"] == "feedback" and details["scope"] == "ip"

    blocked = await rl.decide(guest("/api/feedback", ip))  # refusal 4: a block
    assert blocked.refusal is not None
    assert events.types() == ["rate_limit_exceeded", "rate_limit_block"]
    severity, details = events.events[1].severity, events.events[1].details
    assert severity == telemetry_pb2.SEVERITY_HIGH
    assert details["level"] == "1" and details["duration_seconds"] == "60"

    for path in ("/api/feedback", "/api/quota", "/api/generate", "/api/health"):
        refused = await rl.decide(guest(path, ip))
        assert refused.refusal is not None
        assert refused.statuses[0].result is not None
        assert refused.statuses[0].result.verdict is Verdict.BLOCKED
        assert refused.refusal.metadata["limit"] == "block"
        assert 55 < (refused.refusal.retry_after_seconds or 0) <= 60
    assert len(events.events) == 2  # blocked requests add no rows


async def test_with_blocking_off_each_burst_is_still_one_event_and_nobody_is_blocked() -> None:
    events = RecordedEvents()
    now = [1_000_000.0]
    rl = RateLimitDecider(
        config(RATE_LIMIT_BLOCK_AFTER="0", RATE_LIMIT_VIOLATION_WINDOW="1m"),
        MemoryLimiter(clock=lambda: now[0]),
        ClientNetworks(),
        events,
    )
    ip = fresh_ip()
    for _ in range(3):
        await rl.decide(guest("/api/feedback", ip))
    for _ in range(50):  # far past any block threshold: refused, never blocked
        refused = await rl.decide(guest("/api/feedback", ip))
        assert refused.refusal is not None
        assert refused.refusal.metadata["limit"] == "feedback"
        assert refused.statuses[0].result is not None
        assert refused.statuses[0].result.verdict is Verdict.LIMITED
    assert events.types() == ["rate_limit_exceeded"]
    assert events.events[0].details["route"] == "feedback"
    assert events.events[0].identity.client_ip == ip
    assert not (await rl.decide(guest("/api/quota", ip))).over_limit

    now[0] += 61  # the window has passed (and the allowance refilled): a new burst
    for _ in range(3):
        assert not (await rl.decide(guest("/api/feedback", ip))).over_limit
    for _ in range(5):
        assert (await rl.decide(guest("/api/feedback", ip))).over_limit
    assert events.types() == ["rate_limit_exceeded", "rate_limit_exceeded"]


async def test_a_blocked_user_is_refused_wherever_they_come_from() -> None:
    events = RecordedEvents()
    rl = decider(events, RATE_LIMIT_BLOCK_AFTER="1")
    for _ in range(3):
        await rl.decide(user("/api/feedback", fresh_ip(), "u-blocked"))
    assert events.types() == ["rate_limit_block"]
    assert events.events[0].identity.user_id == "u-blocked"
    refused = await rl.decide(user("/api/quota", fresh_ip(), "u-blocked"))
    assert refused.refusal is not None and refused.refusal.metadata["scope"] == "user"
    assert "user is blocked" in refused.refusal.message


async def test_the_longest_wait_is_the_one_reported() -> None:
    rl = decider(RATE_LIMIT_BLOCK_AFTER="0", RATE_LIMIT_FEEDBACK_PER_IP="1/hour")
    ip = fresh_ip()
    await rl.decide(user("/api/feedback", ip, "u-3"))
    refused = await rl.decide(user("/api/feedback", ip, "u-3"))  # IP: an hour; user: fine
    assert refused.refusal is not None
    assert refused.refusal.metadata["scope"] == "ip"
    assert 3580 < (refused.refusal.retry_after_seconds or 0) <= 3600


# -- failed admin attempts ----------------------------------------------------------------------

ADMIN_TOKEN = "the-admin-token"


def admin_decider(events: RecordedEvents, **env: str) -> RateLimitDecider:
    return RateLimitDecider(
        config(RATE_LIMIT_ADMIN_FAILURES_PER_IP="3/minute", **env),
        MemoryLimiter(),
        ClientNetworks(),
        events,
        admin_token=ADMIN_TOKEN,
    )


def admin_call(ip: str, **credential: str) -> list[dict[str, str]]:
    """The descriptors Envoy sends for an admin path (see envoy.yaml.tmpl)."""
    path = "/api/admin/blocks"
    return [
        {"path": path, "remote_address": ip},
        {"admin_auth": "check", "path": path, "remote_address": ip, **credential},
    ]


async def test_guessed_admin_tokens_are_refused_after_a_few_and_reported_once() -> None:
    events = RecordedEvents()
    rl = admin_decider(events)
    ip = fresh_ip()
    for guess in range(3):
        decision = await rl.decide(admin_call(ip, admin_token=f"guess-{guess}"))
        assert not decision.over_limit
    refused = await rl.decide(admin_call(ip, admin_token="guess-3"))
    assert refused.over_limit and refused.refusal is not None
    assert refused.refusal.metadata["limit"] == "admin_failures"
    assert "failed admin attempts" in refused.refusal.message
    assert refused.refusal.retry_after_seconds is not None
    assert refused.refusal.retry_after_seconds > 0
    # One event for the burst of failures, one for the first refusal: not one per guess.
    assert events.types() == ["admin_auth_failed", "rate_limit_exceeded"]
    who, details = events.events[0].identity, events.events[0].details
    assert who.client_ip == ip
    assert details["reason"] == "invalid_token"
    assert details["path"] == "/api/admin/blocks"
    assert ADMIN_TOKEN not in json.dumps(details) and "guess" not in json.dumps(details)


async def test_the_right_token_or_the_admin_role_never_counts_as_a_failure() -> None:
    events = RecordedEvents()
    rl = admin_decider(events)
    ip = fresh_ip()
    for _ in range(10):
        assert not (await rl.decide(admin_call(ip, admin_token=ADMIN_TOKEN))).over_limit
        assert not (await rl.decide(admin_call(ip, user="u-admin", role="admin"))).over_limit
    assert events.types() == []


async def test_a_users_token_without_the_role_and_no_credential_are_failures() -> None:
    events = RecordedEvents()
    rl = admin_decider(events)
    ip = fresh_ip()
    # The role alone, without a verified user, is not an admin (Envoy sets both together).
    attempts = [{"user": "u-1", "role": "authenticated"}, {}, {"role": "admin"}]
    for credential in attempts:
        assert not (await rl.decide(admin_call(ip, **credential))).over_limit
    assert (await rl.decide(admin_call(ip))).over_limit
    assert events.events[0].details["reason"] == "not_admin"


async def test_failed_admin_attempts_escalate_to_a_block_of_the_network() -> None:
    events = RecordedEvents()
    rl = admin_decider(events)
    ip = fresh_ip()
    for _ in range(3 + 3):  # the allowance, then RATE_LIMIT_BLOCK_AFTER refusals
        await rl.decide(admin_call(ip, admin_token="wrong"))
    assert "rate_limit_block" in events.types()
    # Blocked on every route now, the public ones included.
    blocked = await rl.decide(guest("/api/quota", ip))
    assert blocked.over_limit and blocked.refusal is not None
    assert blocked.refusal.metadata["limit"] == "block"


async def test_admin_failures_are_counted_per_network_and_only_on_admin_descriptors() -> None:
    events = RecordedEvents()
    rl = admin_decider(events)
    first, second = fresh_ip(), fresh_ip()
    for _ in range(3):
        await rl.decide(admin_call(first, admin_token="wrong"))
    assert (await rl.decide(admin_call(first, admin_token="wrong"))).over_limit
    assert not (await rl.decide(admin_call(second, admin_token="wrong"))).over_limit
    # Public paths never send the admin descriptor: nothing counted for them.
    for _ in range(5):
        assert not (await rl.decide(guest("/api/quota", second))).over_limit
