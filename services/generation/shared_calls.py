"""Upstream calls shared by identical requests (single-flight): a cache miss joins the call
already in flight for its key, on this replica or, through a Redis lease, on another one, or
leads a new one. The leader takes the in-flight slot, makes the call behind the breaker and
the retry loop, caches the answer and publishes the outcome to every follower; a follower
whose leader fails gets the same error, never a second call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from services.common.errors import ServiceError
from services.generation.answer import Answer
from services.generation.cache import ResilientResponseCache
from services.generation.cache_policy import CachePolicy
from services.generation.flight_leases import FlightLeases, Following, Lease
from services.generation.flights import FLIGHT_JOINS, Flight, SingleFlight
from services.generation.inflight import InFlightLimiter, Slot
from services.generation.upstream import Prompt
from services.generation.upstream_calls import UpstreamCaller
from services.generation.upstream_errors import upstream_timeout, upstream_unavailable

T = TypeVar("T")

# A subscriber waits this much past its deadline for the flight's outcome: when the flight
# shares that deadline (its leader's), the flight's own verdict, which knows whether the
# upstream had its full time, arrives first. It stays well inside DEADLINE_MARGIN_SECONDS.
SUBSCRIBER_GRACE_SECONDS = 0.1


@dataclass(frozen=True)
class PreparedGeneration:
    prompt: Prompt
    cache_key: str
    tags: tuple[str, ...]
    policy: CachePolicy

    @property
    def flight_key(self) -> str:
        """Requests share an upstream call only if they would also store its answer the same
        way (same entry, same tags, or both storing nothing)."""
        if not self.policy.write:
            return f"{self.cache_key}:no-store"
        if self.policy.extra_tags:
            return f"{self.cache_key}:" + ",".join(sorted(self.policy.extra_tags))
        return self.cache_key


class SharedCalls:
    def __init__(
        self,
        caller: UpstreamCaller,
        cache: ResilientResponseCache,
        limiter: InFlightLimiter,
        leases: FlightLeases | None,
    ) -> None:
        self.caller = caller
        self.cache = cache
        self.limiter = limiter
        # None without Redis: single-flight is then per replica.
        self.leases = leases
        self.flights = SingleFlight()

    def in_flight(self, prepared: PreparedGeneration) -> bool:
        return self.flights.find(prepared.flight_key) is not None

    def subscribe(self, flight: Flight) -> contextlib.AbstractAsyncContextManager[Flight]:
        return self.flights.subscribe(flight)

    def flight(
        self, prepared: PreparedGeneration, deadline: float | None, *, streaming: bool
    ) -> Flight:
        """The call in flight for this request: an identical one's, or a new one. A new one
        takes an in-flight slot first, so only a request that would make the call itself can
        be refused as OVERLOADED."""
        flight = self.flights.find(prepared.flight_key)
        if flight is not None:
            FLIGHT_JOINS.labels("replica").inc()
            return flight
        slot = self.limiter.acquire()
        return self.flights.start(
            prepared.flight_key,
            lambda flight: self._lead(flight, prepared, deadline, slot, streaming=streaming),
        )

    async def _lead(
        self,
        flight: Flight,
        prepared: PreparedGeneration,
        deadline: float | None,
        slot: Slot | None,
        *,
        streaming: bool,
    ) -> None:
        """Runs in the flight's task: follow another replica's call for the same key, or make
        the call, cache its answer and publish the outcome."""
        try:
            claim = await self._claim(prepared.flight_key)
            while isinstance(claim, Following):
                if slot is not None:  # another replica makes the call: no slot needed here
                    slot.release()
                    slot = None
                FLIGHT_JOINS.labels("cluster").inc()
                assert self.leases is not None
                outcome = await within(deadline, self.leases.follow(claim))
                if isinstance(outcome, Answer):
                    flight.finish(outcome)
                    return
                if isinstance(outcome, ServiceError):
                    flight.fail(outcome)
                    return
                claim = await self._claim(prepared.flight_key)  # the leader went away
            if slot is None:
                slot = self.limiter.acquire()
            await self._call(flight, prepared, deadline, claim, streaming=streaming)
        finally:
            if slot is not None:
                slot.release()

    async def _claim(self, key: str) -> Lease | Following | None:
        return None if self.leases is None else await self.leases.claim(key)

    async def _call(
        self,
        flight: Flight,
        prepared: PreparedGeneration,
        deadline: float | None,
        lease: Lease | None,
        *,
        streaming: bool,
    ) -> None:
        caller = self.caller
        renewed = (
            self.leases.renewed(lease)
            if self.leases is not None and lease is not None
            else contextlib.nullcontext()
        )
        published = False
        try:
            async with renewed:
                try:
                    if streaming:
                        answer = await self._stream_into(flight, caller, prepared, deadline)
                    else:
                        # Bounded by the deadline inside, attempt by attempt: an outer
                        # timeout would pre-empt the attempt's own verdict on the upstream.
                        answer = await caller.complete(prepared.prompt, deadline)
                except ServiceError as err:
                    if self.leases is not None and lease is not None:
                        await self.leases.publish(lease, err)
                        published = True
                    raise
            if prepared.policy.write:
                await self.cache.put(prepared.cache_key, answer, prepared.tags)
            if self.leases is not None and lease is not None:
                await self.leases.publish(lease, answer)
                published = True
            flight.finish(answer)
        finally:
            if not published and self.leases is not None and lease is not None:
                # Cancelled (every caller left) or a bug: let another replica take over.
                await asyncio.shield(self.leases.release(lease))

    async def _stream_into(
        self,
        flight: Flight,
        caller: UpstreamCaller,
        prepared: PreparedGeneration,
        deadline: float | None,
    ) -> Answer:
        """Streams the upstream's deltas into the flight; the complete Answer, with its
        chunking, at the end. Only a stream that completed becomes an Answer."""
        chunks: list[int] = []
        final: Answer | None = None
        async with contextlib.aclosing(caller.stream(prepared.prompt, deadline)) as pieces:
            async for piece in pieces:
                if isinstance(piece, Answer):
                    final = piece
                else:
                    chunks.append(len(piece))
                    flight.push(piece)
        if final is None:
            raise upstream_unavailable("the model API ended the stream without an answer", None)
        return dataclasses.replace(final, chunks=tuple(chunks))


async def within(deadline: float | None, waiting: Awaitable[T], *, grace: float = 0.0) -> T:
    """`waiting`, bounded by the caller's deadline (plus `grace`): past it, UPSTREAM_TIMEOUT
    (this caller's own timeout; it says nothing about the upstream's health)."""
    try:
        async with asyncio.timeout_at(None if deadline is None else deadline + grace):
            return await waiting
    except TimeoutError:
        raise upstream_timeout().error from None
