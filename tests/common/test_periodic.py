"""A periodic job outlives its failures and stops when told."""

from __future__ import annotations

import asyncio

from services.common.periodic import PeriodicJob


async def test_a_failing_job_is_retried_sooner_and_stop_ends_the_loop() -> None:
    runs: list[float] = []

    async def job() -> None:
        runs.append(asyncio.get_running_loop().time())
        if len(runs) < 3:
            raise RuntimeError("database away")

    periodic = PeriodicJob("test-job", job, interval_seconds=10, retry_seconds=0.01)
    await periodic.start()
    async with asyncio.timeout(2):
        while len(runs) < 3:
            await asyncio.sleep(0.005)
    assert periodic.running  # failures did not end it
    await asyncio.sleep(0.05)
    assert len(runs) == 3  # after a success, the next run waits the whole interval
    await periodic.stop()
    assert not periodic.running
