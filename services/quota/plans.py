"""Plans, their daily limits, a caller's quota for today, and the error when it is used up."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import grpc

from services.common.errors import Reason, ServiceError


class Plan(StrEnum):
    GUEST = "guest"
    FREE = "free"
    PRO = "pro"


@dataclass(frozen=True)
class QuotaLimits:
    guest: int
    free: int
    pro: int

    def for_plan(self, plan: Plan) -> int:
        return {Plan.GUEST: self.guest, Plan.FREE: self.free, Plan.PRO: self.pro}[plan]


def user_plan(is_pro: bool) -> Plan:
    return Plan.PRO if is_pro else Plan.FREE


@dataclass(frozen=True)
class QuotaStatus:
    """One caller's quota for the current day."""

    plan: Plan
    limit: int
    used: int
    resets_at: datetime

    @property
    def remaining(self) -> int:
        # A limit lowered during the day can leave `used` above it; nothing is left then.
        return max(0, self.limit - self.used)


def iso_utc(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def quota_exhausted(status: QuotaStatus, seconds_until_reset: float) -> ServiceError:
    resets_at = iso_utc(status.resets_at)
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.QUOTA_EXHAUSTED,
        f"daily quota of {status.limit} generations used; it resets at {resets_at}",
        retry_after_seconds=seconds_until_reset,
        metadata={"limit": str(status.limit), "plan": status.plan.value, "resets_at": resets_at},
    )
