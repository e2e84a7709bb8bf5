"""GEN_MAX_INFLIGHT: generations beyond the limit fail fast with OVERLOADED rather than queue,
so a replica under a burst answers quickly and the load balancer or client can go elsewhere."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from prometheus_client import Gauge

from services.common.errors import Reason, ServiceError

INFLIGHT = Gauge("genmesh_generation_inflight", "Generations running on this replica.")


class InFlightLimiter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the block; raises UNAVAILABLE/OVERLOADED when none is free."""
        if self.active >= self.limit:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.OVERLOADED,
                f"too many generations in progress (limit {self.limit}), try again shortly",
                retry_after_seconds=1,
            )
        self.active += 1
        INFLIGHT.inc()
        try:
            yield
        finally:
            self.active -= 1
            INFLIGHT.dec()
