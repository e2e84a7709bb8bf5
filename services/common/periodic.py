"""A background job run now and then every interval until stopped, for maintenance that must
outlive its own failures (a database outage must not end it, nor the service)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class PeriodicJob:
    def __init__(
        self,
        name: str,
        job: Callable[[], Awaitable[object]],
        interval_seconds: float,
        retry_seconds: float | None = None,
    ) -> None:
        self.name = name
        self.job = job
        self.interval_seconds = interval_seconds
        # After a failure, the next run comes this soon (default: the interval).
        self.retry_seconds = interval_seconds if retry_seconds is None else retry_seconds
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """True between `start` and `stop` while the loop is alive."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Run now, then every interval, until `stop`. Does not wait for the first run."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            delay = self.interval_seconds
            try:
                await self.job()
            except Exception:
                # What is left now is done by a later run.
                delay = min(self.interval_seconds, self.retry_seconds)
                log.exception("%s failed; next attempt in %gs", self.name, delay)
            await asyncio.sleep(delay)
