"""GroupCommitter with an in-memory writer: what gets batched together, who learns what."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import pytest

from services.common.errors import ServiceError
from services.telemetry.group_commit import BatchLimits, GroupCommitter


class MemoryWriter:
    """Records every batch; fails batches holding a "bad" row; can be held to keep a batch
    in flight while the test submits more."""

    def __init__(self) -> None:
        self.batches: list[list[list[str]]] = []
        self.hold: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self, batch: Sequence[Sequence[str]]) -> list[str]:
        self.batches.append([list(rows) for rows in batch])
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        if any("bad" in rows for rows in batch):
            raise RuntimeError("constraint violated")
        return ["+".join(rows) for rows in batch]


def committer(writer: MemoryWriter, **limits: float) -> GroupCommitter[str, str]:
    return GroupCommitter("test", writer, BatchLimits(**limits))  # type: ignore[arg-type]


async def test_concurrent_submissions_share_one_write_and_each_gets_its_result() -> None:
    writer = MemoryWriter()
    gc = committer(writer, max_wait_seconds=0.05)
    results = await asyncio.gather(*(gc.submit([f"r{i}", f"s{i}"]) for i in range(10)))
    assert results == [f"r{i}+s{i}" for i in range(10)]
    assert len(writer.batches) == 1
    assert len(writer.batches[0]) == 10
    assert gc.stats.batches == 1
    assert gc.stats.shared_batches == 1
    assert gc.stats.largest_batch_submissions == 10
    assert gc.stats.rows == 20


async def test_a_lone_submission_is_written_without_company() -> None:
    writer = MemoryWriter()
    gc = committer(writer, max_wait_seconds=0)
    assert await gc.submit(["only"]) == "only"
    assert writer.batches == [[["only"]]]
    assert gc.stats.shared_batches == 0


async def test_a_failing_write_fails_exactly_its_callers() -> None:
    writer = MemoryWriter()
    writer.hold = asyncio.Event()
    gc = committer(writer, max_wait_seconds=0, max_in_flight=1)
    first_batch = [asyncio.create_task(gc.submit([row])) for row in ("ok-1", "bad")]
    await writer.started.wait()
    # While the first batch is being written, these gather into the next one.
    second_batch = [asyncio.create_task(gc.submit([row])) for row in ("ok-2", "ok-3")]
    await asyncio.sleep(0)
    writer.hold.set()
    first = await asyncio.gather(*first_batch, return_exceptions=True)
    second = await asyncio.gather(*second_batch)
    assert [type(r) for r in first] == [RuntimeError, RuntimeError]
    assert second == ["ok-2", "ok-3"]
    assert [len(b) for b in writer.batches] == [2, 2]
    assert gc.stats.failed_batches == 1
    assert gc.stats.rows == 2  # only the committed ones


async def test_max_rows_splits_batches_but_never_a_submission() -> None:
    writer = MemoryWriter()
    gc = committer(writer, max_rows=5, max_wait_seconds=0.05)
    pairs = [[f"a{i}", f"b{i}"] for i in range(4)]
    await asyncio.gather(*(gc.submit(rows) for rows in pairs))
    assert [sum(len(rows) for rows in batch) for batch in writer.batches] == [4, 4]
    big = [f"x{i}" for i in range(7)]
    assert await gc.submit(big) == "+".join(big)
    assert writer.batches[-1] == [big]


async def test_a_full_batch_is_written_without_waiting_for_the_deadline() -> None:
    writer = MemoryWriter()
    # The deadline is far away: only reaching max_rows can start the write.
    gc = committer(writer, max_rows=3, max_wait_seconds=3600)
    results = await asyncio.wait_for(asyncio.gather(*(gc.submit([str(i)]) for i in range(3))), 30)
    assert results == ["0", "1", "2"]


async def test_a_caller_that_left_before_its_batch_is_not_written() -> None:
    writer = MemoryWriter()
    writer.hold = asyncio.Event()
    gc = committer(writer, max_wait_seconds=0, max_in_flight=1)
    busy = asyncio.create_task(gc.submit(["first"]))
    await writer.started.wait()
    gone = asyncio.create_task(gc.submit(["gone"]))
    kept = asyncio.create_task(gc.submit(["kept"]))
    await asyncio.sleep(0)
    gone.cancel()
    writer.hold.set()
    assert await busy == "first"
    assert await kept == "kept"
    assert writer.batches[1] == [["kept"]]


async def test_too_many_waiting_rows_fail_fast_with_retry_info() -> None:
    writer = MemoryWriter()
    writer.hold = asyncio.Event()
    gc = committer(writer, max_wait_seconds=0, max_in_flight=1, max_pending_rows=3)
    busy = asyncio.create_task(gc.submit(["in-flight"]))
    await writer.started.wait()
    waiting = asyncio.create_task(gc.submit(["a", "b"]))
    await asyncio.sleep(0)
    with pytest.raises(ServiceError) as caught:
        await gc.submit(["c", "d"])
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert caught.value.retry_after_seconds
    assert gc.stats.rejected_submissions == 1
    writer.hold.set()
    assert await busy == "in-flight"
    assert await waiting == "a+b"


async def test_close_writes_what_is_pending_then_refuses_new_work() -> None:
    writer = MemoryWriter()
    gc = committer(writer, max_wait_seconds=0.05)
    pending = asyncio.create_task(gc.submit(["late"]))
    await asyncio.sleep(0)
    await gc.close()
    assert await pending == "late"
    with pytest.raises(ServiceError) as caught:
        await gc.submit(["after"])
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


async def test_a_writer_that_miscounts_fails_its_callers() -> None:
    async def broken(batch: Sequence[Sequence[str]]) -> list[str]:
        return []

    gc: GroupCommitter[str, str] = GroupCommitter("broken", broken)
    with pytest.raises(RuntimeError, match="results"):
        await gc.submit(["x"])


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        BatchLimits(max_rows=0)
