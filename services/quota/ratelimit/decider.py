"""The rate-limit decision for one request, without gRPC: which limits the request counts
against (its route and who sends it), the checks themselves (concurrently, one per subject),
the refusal a client sees, and the security events abuse produces.

Envoy describes a request as descriptors, each a set of entries: `path` (the REST path) with
`remote_address` (the client IP Envoy trusts) or with `user` (the verified JWT subject). Each
descriptor is one check; the request passes only if every check does. A descriptor whose
route has no limit for its scope (`off`) counts nothing but is still checked for a block: a
blocked caller is refused on every route. Descriptors of any other shape are answered OK
without counting anything, so a stray entry cannot block traffic.

The checks of one request run concurrently; the Redis limiter bounds each by the decision's
Redis budget (RATE_LIMIT_REDIS_TIMEOUT_MS) and the fallback decides from memory past it, so a
decision always comes within Envoy's wait.

Admin paths add one more descriptor, marked `admin_auth`, carrying the credential presented
(`admin_token`, and the verified `user` and `role`). A request without an admin credential
counts one failed attempt against `admin_failures` for its client network: a guesser is
refused after a few tries and, if it goes on, blocked. The service still answers the attempts
that pass with 401 or 403.

Security events are aggregated: one `rate_limit_exceeded` per burst of refusals (the first
refusal in an escalation window, whether or not blocking is on), one `rate_limit_block` per
block, never one per request, so an attacker cannot make the database write a row per
request. Failed admin attempts are reported the same way: one `admin_auth_failed` when a
burst of them starts.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

from services.common.admin_auth import credential_is_admin
from services.common.client_networks import ClientNetworks
from services.common.errors import Reason, ServiceError
from services.common.identity import Identity
from services.common.security_events import SEVERITY_HIGH, SEVERITY_MEDIUM, SecurityEventSink
from services.quota.ratelimit.config import (
    ADMIN_FAILURES,
    Escalation,
    Limit,
    RateLimitConfig,
    Scope,
)
from services.quota.ratelimit.limiter import CheckResult, Limiter, Subject, Verdict

PATH_ENTRY = "path"
REMOTE_ADDRESS_ENTRY = "remote_address"
USER_ENTRY = "user"
ADMIN_AUTH_ENTRY = "admin_auth"
ADMIN_TOKEN_ENTRY = "admin_token"  # noqa: S105 - a descriptor key, not a secret
ROLE_ENTRY = "role"

DECISIONS = Counter(
    "genmesh_ratelimit_decisions_total",
    "Rate-limit checks, by route, scope and verdict.",
    ["route", "scope", "verdict"],
)


@dataclass(frozen=True)
class DescriptorStatus:
    """The outcome for one descriptor. `result` is None when nothing was counted (no limit
    applies to it)."""

    name: str
    limit: Limit | None
    result: CheckResult | None


@dataclass(frozen=True)
class Decision:
    statuses: tuple[DescriptorStatus, ...]
    # Set when the request is refused: what the client is told.
    refusal: ServiceError | None

    @property
    def over_limit(self) -> bool:
        return self.refusal is not None


@dataclass(frozen=True)
class _Check:
    index: int
    route: str
    subject: Subject
    # None: the route has no limit for this scope; only a block can refuse the request.
    limit: Limit | None

    async def run(self, limiter: Limiter, escalation: Escalation) -> CheckResult | None:
        if self.limit is None:
            return await limiter.blocked(self.subject)
        return await limiter.check(self.subject, self.route, self.limit, escalation)


def _seconds(milliseconds: int) -> int:
    return max(1, math.ceil(milliseconds / 1000))


def refusal(route: str, subject: Subject, limit: Limit | None, result: CheckResult) -> ServiceError:
    """RATE_LIMITED, saying which limit was hit (never QUOTA_EXHAUSTED: that is the daily
    quota, a different thing with a different remedy)."""
    wait = _seconds(result.retry_after_ms)
    who = "client network" if subject.scope is Scope.IP else "user"
    if result.verdict is Verdict.BLOCKED or limit is None:
        message = f"this {who} is blocked for repeatedly exceeding rate limits; retry in {wait} s"
        # What was hit is the block, whichever route this request was for.
        metadata = {
            "limit": "block",
            "scope": subject.scope.value,
            "route": route,
            "block_level": str(result.block_level),
        }
    elif route == ADMIN_FAILURES:
        message = f"too many failed admin attempts from this {who}; retry in {wait} s"
        metadata = {"limit": route, "scope": subject.scope.value, "policy": str(limit)}
    else:
        message = (
            f"rate limit exceeded: {limit.requests} {route} requests per {limit.unit.value} "
            f"per {who}; retry in {wait} s"
        )
        metadata = {"limit": route, "scope": subject.scope.value, "policy": str(limit)}
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.RATE_LIMITED,
        message,
        retry_after_seconds=result.retry_after_ms / 1000,
        metadata=metadata,
    )


class RateLimitDecider:
    def __init__(
        self,
        config: RateLimitConfig,
        limiter: Limiter,
        networks: ClientNetworks,
        security_events: SecurityEventSink | None = None,
        admin_token: str = "",
    ) -> None:
        self.config = config
        self.limiter = limiter
        self.networks = networks
        self.security_events = security_events
        # GENMESH_ADMIN_TOKEN: a request presenting it is not a failed admin attempt.
        self.admin_token = admin_token

    def _subject(self, entries: Mapping[str, str]) -> Subject | None:
        if ip := entries.get(REMOTE_ADDRESS_ENTRY):
            network = self.networks.network_of(ip)
            return Subject(Scope.IP, network) if network else None
        if user := entries.get(USER_ENTRY):
            return Subject(Scope.USER, user)
        return None

    async def decide(self, descriptors: Sequence[Mapping[str, str]]) -> Decision:
        statuses: list[DescriptorStatus] = []
        checks: list[_Check] = []
        for index, entries in enumerate(descriptors):
            if ADMIN_AUTH_ENTRY in entries:
                status, failed = self._admin_attempt(index, entries)
                statuses.append(status)
                checks.extend(failed)
                continue
            subject = self._subject(entries)
            route = self.config.route_for(entries.get(PATH_ENTRY, ""))
            limit = route.limit(subject.scope) if subject is not None else None
            name = f"{route.name}.per_{subject.scope.value}" if subject else route.name
            statuses.append(DescriptorStatus(name, limit, None))
            if subject is not None:
                # Without a limit, still a check: for the subject's block.
                checks.append(_Check(index, route.name, subject, limit))

        escalation = self.config.escalation
        results: Sequence[CheckResult | None]
        if len(checks) == 1:  # a guest: no task to spawn for one check
            results = [await checks[0].run(self.limiter, escalation)]
        else:
            results = await asyncio.gather(*(c.run(self.limiter, escalation) for c in checks))
        counted: list[tuple[_Check, CheckResult]] = []
        for check, result in zip(checks, results, strict=True):
            if result is None:  # no limit and no block: nothing to say
                continue
            statuses[check.index] = DescriptorStatus(
                statuses[check.index].name, check.limit, result
            )
            DECISIONS.labels(check.route, check.subject.scope.value, result.verdict.value).inc()
            counted.append((check, result))
        self._report_admin_failures(descriptors, counted)
        refused = [(c, r) for c, r in counted if r.refused]
        if not refused:
            return Decision(tuple(statuses), None)
        self._report(descriptors, refused)
        # The client must wait for every refusal to pass: tell it the longest.
        check, result = max(refused, key=lambda pair: pair[1].retry_after_ms)
        return Decision(tuple(statuses), refusal(check.route, check.subject, check.limit, result))

    def _admin_attempt(
        self, index: int, entries: Mapping[str, str]
    ) -> tuple[DescriptorStatus, list[_Check]]:
        """The admin descriptor: nothing to count for an admin, one failed attempt otherwise."""
        limit = self.config.admin_failures.per_ip
        status = DescriptorStatus(ADMIN_FAILURES, None, None)
        admin = credential_is_admin(
            entries.get(ADMIN_TOKEN_ENTRY, ""),
            entries.get(ROLE_ENTRY, ""),
            entries.get(USER_ENTRY, ""),
            self.admin_token,
        )
        network = self.networks.network_of(entries.get(REMOTE_ADDRESS_ENTRY, ""))
        if admin or limit is None or not network:
            return status, []
        subject = Subject(Scope.IP, network)
        return DescriptorStatus(ADMIN_FAILURES, limit, None), [
            _Check(index, ADMIN_FAILURES, subject, limit)
        ]

    def _report_admin_failures(
        self, descriptors: Sequence[Mapping[str, str]], counted: list[tuple[_Check, CheckResult]]
    ) -> None:
        """One event when a burst of failed admin attempts starts: the first failure that
        finds the client's allowance whole. The refusals and blocks that follow a burst are
        reported as rate-limit events."""
        if self.security_events is None:
            return
        for check, result in counted:
            if check.route != ADMIN_FAILURES or check.limit is None or result.refused:
                continue
            if result.remaining != check.limit.requests - 1:
                continue
            entries = descriptors[check.index]
            reason = (
                "invalid_token"
                if entries.get(ADMIN_TOKEN_ENTRY)
                else "not_admin"
                if entries.get(USER_ENTRY)
                else "missing"
            )
            identity = Identity(
                user_id=entries.get(USER_ENTRY, ""),
                email="",
                client_ip=entries.get(REMOTE_ADDRESS_ENTRY, ""),
            )
            self.security_events.report(
                "admin_auth_failed",
                SEVERITY_MEDIUM,
                identity,
                {
                    "path": entries.get(PATH_ENTRY, "").split("?", 1)[0][:200],
                    "reason": reason,
                    "subject": check.subject.value,
                    "limit": str(check.limit),
                },
            )

    def _report(
        self, descriptors: Sequence[Mapping[str, str]], refused: list[tuple[_Check, CheckResult]]
    ) -> None:
        if self.security_events is None:
            return
        identity = Identity(
            user_id=next((d[USER_ENTRY] for d in descriptors if d.get(USER_ENTRY)), ""),
            email="",
            client_ip=next(
                (d[REMOTE_ADDRESS_ENTRY] for d in descriptors if d.get(REMOTE_ADDRESS_ENTRY)), ""
            ),
        )
        for check, result in refused:
            if not result.started_block and result.violations != 1:
                continue  # within a burst already reported, or a block already reported
            details = {
                "route": check.route,
                "scope": check.subject.scope.value,
                "subject": check.subject.value,
                "limit": str(check.limit) if check.limit is not None else "off",
            }
            if result.started_block:
                self.security_events.report(
                    "rate_limit_block",
                    SEVERITY_HIGH,
                    identity,
                    {
                        **details,
                        "level": str(result.block_level),
                        "duration_seconds": str(_seconds(result.retry_after_ms)),
                        "violations": str(result.violations),
                    },
                )
            else:
                self.security_events.report(
                    "rate_limit_exceeded", SEVERITY_MEDIUM, identity, details
                )
