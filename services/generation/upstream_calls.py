"""The upstream behind its guards: the circuit breaker, one retry loop and the caller's
deadline. Every attempt asks the breaker for a permit and reports its outcome; the SDK's own
retries are off (they would hide failures from the breaker while a quota unit is held).

Retries: transient failures (timeouts, connection errors, 408, 409, 429, 5xx) are retried with
exponential backoff and full jitter (tenacity's wait_random_exponential), or after the
upstream's Retry-After when it sent one no longer than the longest backoff. No retry starts
when its wait would end past the caller's deadline, and a call the breaker refuses is never
retried: it fails at once with UPSTREAM_UNAVAILABLE and the seconds until the breaker lets
calls through again.

A stream is retried only until its first piece arrives; after that, a failure is the
stream's end (its deltas cannot be taken back).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_random_exponential,
)

from services.common.breaker import CircuitBreaker, Permit
from services.common.errors import ServiceError
from services.generation.answer import Answer
from services.generation.upstream import Prompt, Upstream
from services.generation.upstream_errors import (
    UpstreamError,
    upstream_timeout,
    upstream_unavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# A retry is not worth starting with less than this left before the deadline.
MIN_ATTEMPT_SECONDS = 0.2


@dataclass(frozen=True)
class RetryPolicy:
    # Retries after the first attempt (OPENAI_MAX_RETRIES); 0 disables them.
    max_retries: int = 2
    # Backoff before retry n is uniform in [0, min(max_delay, base_delay * 2**(n-1))].
    base_delay_seconds: float = 0.5
    # The longest wait before a retry, the upstream's Retry-After included: a longer
    # Retry-After ends the loop and reaches the caller.
    max_delay_seconds: float = 8.0


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamError) and exc.retryable


class UpstreamCaller:
    def __init__(
        self,
        upstream: Upstream,
        breaker: CircuitBreaker,
        policy: RetryPolicy,
        upstream_timeout_seconds: float,
    ) -> None:
        self.upstream = upstream
        self.breaker = breaker
        self.policy = policy
        # OPENAI_TIMEOUT_SECONDS: an attempt cut short before this is the caller's deadline's
        # doing, not the upstream's, and must not count against it.
        self.upstream_timeout_seconds = upstream_timeout_seconds
        self._backoff = wait_random_exponential(
            multiplier=policy.base_delay_seconds, max=policy.max_delay_seconds
        )

    # -- public ----------------------------------------------------------------------------------

    def refusal(self) -> ServiceError:
        """The error for a call the breaker does not admit."""
        return upstream_unavailable(
            "the model API is failing; requests are paused while it recovers",
            max(1.0, self.breaker.retry_after()),
        )

    async def complete(self, prompt: Prompt, deadline: float | None) -> Answer:
        async def attempt(permit: Permit) -> Answer:
            answer = await self.upstream.complete(prompt)
            permit.success()
            return answer

        return await self._with_retries(attempt, deadline)

    async def stream(
        self, prompt: Prompt, deadline: float | None
    ) -> AsyncGenerator[str | Answer, None]:
        """The upstream's pieces (deltas, then the Answer). Each wait is bounded by the
        deadline; raises ServiceError, possibly after some pieces."""

        async def attempt(
            permit: Permit,
        ) -> tuple[Permit, AsyncGenerator[str | Answer, None], str | Answer]:
            pieces = self.upstream.stream(prompt)
            try:
                first = await anext(pieces)
            except BaseException:
                await pieces.aclose()
                raise
            return permit, pieces, first

        permit, pieces, piece = await self._with_retries(attempt, deadline)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with permit:
            try:
                while True:
                    yield piece
                    # The deadline bounds each wait for the upstream, never our own yields.
                    try:
                        async with asyncio.timeout_at(deadline):
                            piece = await anext(pieces)
                    except StopAsyncIteration:
                        break
                    except UpstreamError as err:
                        raise self._failed(err, permit) from None
                    except TimeoutError:
                        raise self._deadline_passed(permit, loop.time() - started) from None
            finally:
                await pieces.aclose()
            permit.success()

    # -- the loop --------------------------------------------------------------------------------

    async def _with_retries(
        self, attempt: Callable[[Permit], Awaitable[T]], deadline: float | None
    ) -> T:
        loop = asyncio.get_running_loop()

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome is not None else None
            if isinstance(exc, UpstreamError) and exc.upstream_retry_after is not None:
                return exc.upstream_retry_after
            return float(self._backoff(state))

        def stop(state: RetryCallState) -> bool:
            if state.attempt_number > self.policy.max_retries:
                return True
            sleep = state.upcoming_sleep
            if sleep > self.policy.max_delay_seconds:
                return True  # a Retry-After longer than we are willing to hold a request
            if deadline is not None and loop.time() + sleep + MIN_ATTEMPT_SECONDS > deadline:
                return True
            return self.breaker.retry_after() > 0  # the next attempt would be refused

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            log.info(
                "retrying the model API in %.2fs (attempt %d failed: %s)",
                state.upcoming_sleep,
                state.attempt_number,
                exc,
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=wait,
            stop=stop,
            before_sleep=before_sleep,
            sleep=asyncio.sleep,
            reraise=True,
        )
        try:
            async for retry in retrying:
                with retry:
                    return await self._attempt(attempt, deadline)
        except UpstreamError as err:
            raise self._final(err) from None
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover

    async def _attempt(
        self, attempt: Callable[[Permit], Awaitable[T]], deadline: float | None
    ) -> T:
        """One attempt under one breaker permit. Raises UpstreamError (retried if transient)
        or ServiceError (final)."""
        permit = self.breaker.try_acquire()
        if permit is None:
            raise self.refusal()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout_at(deadline):
                return await attempt(permit)
        except UpstreamError as err:
            if err.counts_as_failure:
                permit.failure(err.upstream_retry_after)
            else:
                permit.release()
            raise
        except TimeoutError:
            raise self._deadline_passed(permit, loop.time() - started) from None
        except BaseException:
            # Cancelled (the caller went away) or a bug: no verdict on the upstream.
            permit.release()
            raise

    # -- errors ----------------------------------------------------------------------------------

    def _failed(self, err: UpstreamError, permit: Permit) -> ServiceError:
        if err.counts_as_failure:
            permit.failure(err.upstream_retry_after)
        else:
            permit.release()
        return self._final(err)

    def _final(self, err: UpstreamError) -> ServiceError:
        """The error the caller sees; if the breaker is now refusing calls, its Retry-After
        says how long that lasts, never less."""
        wait = self.breaker.retry_after()
        if not err.counts_as_failure or wait <= 0:
            return err.error
        return dataclasses.replace(
            err.error, retry_after_seconds=max(err.error.retry_after_seconds or 0.0, wait)
        )

    def _deadline_passed(self, permit: Permit, waited: float) -> ServiceError:
        """The caller's deadline cut the attempt short. It counts against the upstream only
        if the upstream had its full OPENAI_TIMEOUT_SECONDS: a client with a tight deadline
        must not be able to open the breaker for everyone."""
        timeout = upstream_timeout()
        if waited >= self.upstream_timeout_seconds:
            permit.failure(None)
            return self._final(timeout)
        permit.release()
        return timeout.error
