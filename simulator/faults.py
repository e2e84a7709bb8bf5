"""Fault injection: what to break, how often, and how hung requests get released."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _check_status(status: int) -> int:
    if status != 0 and not 400 <= status <= 599:
        raise ValueError("must be 0 (no error) or an HTTP error status 400-599")
    return status


FaultStatus = Annotated[int, AfterValidator(_check_status)]
FaultRate = Annotated[float, Field(ge=0.0, le=1.0)]
FaultLatencyMs = Annotated[int, Field(ge=0, le=600_000)]
RetryAfter = Annotated[int, Field(ge=0, le=86_400)]


class FaultSpec(BaseModel):
    """Body of POST /_sim/faults. Omitted fields take these defaults: POST replaces, not merges."""

    # Strict: "500" or 1.0 for an int is a caller bug worth a 400, not a silent coercion.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    status: FaultStatus = 0
    rate: FaultRate = 1.0
    latency_ms: FaultLatencyMs = 0
    retry_after: RetryAfter = 0
    hang: bool = False

    @property
    def active(self) -> bool:
        return bool(self.status or self.latency_ms or self.hang)


@dataclass(frozen=True)
class Injection:
    """The faults one request drew, with the event that releases it if it hangs."""

    spec: FaultSpec
    released: asyncio.Event


class FaultInjector:
    """Current faults. Each generation of faults has its own release event: replacing the
    faults sets it, so requests hung under the old faults answer instead of hanging forever."""

    def __init__(self, spec: FaultSpec, rng: random.Random) -> None:
        self._spec = spec
        self._rng = rng
        self._released = asyncio.Event()
        self.hanging = 0

    @property
    def spec(self) -> FaultSpec:
        return self._spec

    def replace(self, spec: FaultSpec) -> None:
        self._released.set()
        self._released = asyncio.Event()
        self._spec = spec

    def release_all(self) -> None:
        """Free every hung request for good (used at shutdown so it doesn't wait on them)."""
        self._released.set()

    def draw(self) -> Injection | None:
        """Roll the dice for one request; None means it is not affected."""
        spec = self._spec
        # random() < 1.0 always holds, so rate 1.0 always hits and rate 0.0 never does.
        if spec.active and self._rng.random() < spec.rate:
            return Injection(spec, self._released)
        return None

    async def hang(self, injection: Injection) -> None:
        self.hanging += 1
        try:
            await injection.released.wait()
        finally:
            self.hanging -= 1
