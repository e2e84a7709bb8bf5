"""Single-flight within a replica: identical concurrent cache misses share one upstream call.

A `Flight` is that call seen from outside: the deltas so far and the outcome, readable by any
number of subscribers, each from the start. It runs as its own task, so the request that
started it may go away while others still wait; when the last subscriber leaves before it
finishes, the task is cancelled (and with it the upstream request).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import grpc
from prometheus_client import Counter

from services.common.errors import Reason, ServiceError
from services.generation.answer import Answer

log = logging.getLogger(__name__)

FLIGHT_JOINS = Counter(
    "genmesh_generation_singleflight_joins_total",
    "Cache misses that shared another request's upstream call instead of making their own, "
    "by where the call ran (this replica, or another one through the Redis lease).",
    ["scope"],
)


class Flight:
    def __init__(self, key: str) -> None:
        self.key = key
        self.deltas: list[str] = []
        self.answer: Answer | None = None
        self.error: ServiceError | None = None
        self.subscribers = 0
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.answer is not None or self.error is not None

    def push(self, delta: str) -> None:
        self.deltas.append(delta)
        self._notify()

    def finish(self, answer: Answer) -> None:
        if not self.done:
            self.answer = answer
            self._notify()

    def fail(self, error: ServiceError) -> None:
        if not self.done:
            self.error = error
            self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def pieces(self) -> AsyncIterator[str | Answer]:
        """Every delta from the first, then the Answer; raises the flight's error."""
        sent = 0
        while True:
            while sent < len(self.deltas):
                sent += 1
                yield self.deltas[sent - 1]
            if self.answer is not None:
                yield self.answer
                return
            if self.error is not None:
                raise self.error
            await self._changed.wait()

    async def result(self) -> Answer:
        while True:
            if self.answer is not None:
                return self.answer
            if self.error is not None:
                raise self.error
            await self._changed.wait()


class SingleFlight:
    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def find(self, key: str) -> Flight | None:
        return self._flights.get(key)

    def start(self, key: str, run: Callable[[Flight], Coroutine[Any, Any, None]]) -> Flight:
        """A new flight for `key`, running `run(flight)` in its own task. The caller must
        subscribe before its next await, or the flight is cancelled as abandoned."""
        flight = Flight(key)
        self._flights[key] = flight
        flight.task = asyncio.create_task(self._run(flight, run), name=f"flight-{key[:12]}")
        return flight

    async def _run(
        self, flight: Flight, run: Callable[[Flight], Coroutine[Any, Any, None]]
    ) -> None:
        try:
            await run(flight)
            if not flight.done:  # pragma: no cover - a bug in `run`
                raise RuntimeError("flight ended without an outcome")
        except ServiceError as err:
            flight.fail(err)
        except asyncio.CancelledError:
            flight.fail(ServiceError(grpc.StatusCode.CANCELLED, Reason.INTERNAL, "cancelled"))
            raise
        except Exception:
            log.exception("a shared upstream call failed unexpectedly")
            flight.fail(ServiceError(grpc.StatusCode.INTERNAL, Reason.INTERNAL, "internal error"))
        finally:
            self._forget(flight)

    def _forget(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    @asynccontextmanager
    async def subscribe(self, flight: Flight) -> AsyncIterator[Flight]:
        flight.subscribers += 1
        try:
            yield flight
        finally:
            flight.subscribers -= 1
            if flight.subscribers == 0 and not flight.done and flight.task is not None:
                # Nobody waits any more: stop the upstream call, and let the next identical
                # request start afresh rather than join a flight being torn down.
                # Waited for, so the slot and the lease are free when the caller is gone.
                self._forget(flight)
                flight.task.cancel()
                await asyncio.wait([flight.task])
