"""GEN_MAX_INFLIGHT: upstream calls one replica runs at once. Only calls to the model take a
slot: cache hits and requests that share another request's call (single-flight) never do, so
they are never refused. Beyond the limit a call fails fast with OVERLOADED rather than queue,
so a replica under a burst answers quickly and the client can retry elsewhere."""

from __future__ import annotations

import grpc
from prometheus_client import Gauge

from services.common.errors import Reason, ServiceError

INFLIGHT = Gauge("genmesh_generation_inflight", "Upstream model calls running on this replica.")


class Slot:
    """One held slot; `release()` is idempotent."""

    def __init__(self, limiter: InFlightLimiter) -> None:
        self._limiter: InFlightLimiter | None = limiter

    def release(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter.active -= 1
            INFLIGHT.dec()


class InFlightLimiter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def acquire(self) -> Slot:
        """A slot, or UNAVAILABLE/OVERLOADED when none is free."""
        if self.active >= self.limit:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.OVERLOADED,
                f"too many generations in progress (limit {self.limit}), try again shortly",
                retry_after_seconds=1,
            )
        self.active += 1
        INFLIGHT.inc()
        return Slot(self)
