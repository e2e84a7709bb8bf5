"""GroupCommitter when a write fails, with an in-memory writer raising asyncpg's errors: a batch
refused for its content is split until only the requests that cause it fail; a database that is
away fails every caller with UNAVAILABLE and a retry delay."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import grpc
import pytest

from services.common.errors import Reason, ServiceError
from services.telemetry.group_commit import (
    BatchLimits,
    ContentFields,
    Failure,
    GroupCommitter,
    RefusedValue,
    classify,
)

FIELDS = ContentFields({"comment": "comment", "lang": "lang"}, default="request")


def nul_in_comment() -> asyncpg.PostgresError:
    err = asyncpg.CharacterNotInRepertoireError('invalid byte sequence for encoding "UTF8": 0x00')
    err.context = "COPY feedback, line 3, column comment"  # as PostgreSQL reports it
    return err


def lang_too_long() -> asyncpg.PostgresError:
    err = asyncpg.CheckViolationError('new row for relation "feedback" violates check constraint')
    err.constraint_name = "feedback_lang_check"
    return err


class PoisonWriter:
    """Records each write; a write holding a row named in `poison` fails with that row's error,
    all others commit (into `committed`)."""

    def __init__(self, poison: dict[str, Exception]) -> None:
        self.poison = poison
        self.writes: list[list[str]] = []
        self.committed: list[str] = []

    async def __call__(self, batch: Sequence[Sequence[str]]) -> list[str]:
        rows = [row for rows in batch for row in rows]
        self.writes.append(rows)
        for row in rows:
            if row in self.poison:
                raise self.poison[row]
        self.committed.extend(rows)
        return ["+".join(rows) for rows in batch]


def committer(writer: object, **limits: float) -> GroupCommitter[str, str]:
    return GroupCommitter("test", writer, BatchLimits(**limits), FIELDS)  # type: ignore[arg-type]


async def test_a_poisoned_request_fails_alone_and_the_rest_of_its_batch_commits() -> None:
    writer = PoisonWriter({"bad-nul": nul_in_comment(), "bad-lang": lang_too_long()})
    gc = committer(writer, max_wait_seconds=0.05)
    names = [f"ok-{i}" for i in range(6)]
    names[2], names[5] = "bad-nul", "bad-lang"
    results = await asyncio.gather(*(gc.submit([n]) for n in names), return_exceptions=True)

    assert writer.writes[0] == names  # one batch first
    for name, result in zip(names, results, strict=True):
        if name.startswith("ok"):
            assert result == name
        else:
            assert isinstance(result, ServiceError)
            assert result.code is grpc.StatusCode.INVALID_ARGUMENT
            assert result.reason is Reason.INVALID_ARGUMENT
    nul, lang = results[2], results[5]
    assert isinstance(nul, ServiceError) and isinstance(lang, ServiceError)
    assert [v.field for v in nul.violations] == ["comment"]
    assert "NUL" in nul.violations[0].description
    assert [v.field for v in lang.violations] == ["lang"]
    assert sorted(writer.committed) == sorted(n for n in names if n.startswith("ok"))
    assert gc.stats.split_batches >= 1
    assert gc.stats.refused_submissions == 2
    assert gc.stats.rows == 4


async def test_splitting_writes_each_good_request_once() -> None:
    writer = PoisonWriter({"bad": lang_too_long()})
    gc = committer(writer, max_wait_seconds=0.05)
    names = ["bad", *(f"ok-{i}" for i in range(15))]
    results = await asyncio.gather(*(gc.submit([n]) for n in names), return_exceptions=True)
    assert isinstance(results[0], ServiceError)
    assert results[1:] == names[1:]
    assert sorted(writer.committed) == sorted(names[1:])  # no request written twice
    # Bisection: about log2(16) failed writes, not one per request.
    assert len(writer.writes) <= 2 * 4 + 2


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.SerializationError("could not serialize access"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_a_database_that_is_away_fails_every_caller_with_unavailable(
    error: Exception,
) -> None:
    writer = PoisonWriter({f"r{i}": error for i in range(4)})
    gc = committer(writer, max_wait_seconds=0.05)
    results = await asyncio.gather(
        *(gc.submit([f"r{i}"]) for i in range(4)), return_exceptions=True
    )
    assert len(writer.writes) == 1  # not split: retrying a database that is away helps nobody
    for result in results:
        assert isinstance(result, ServiceError), result
        assert result.code is grpc.StatusCode.UNAVAILABLE
        assert result.reason is Reason.DEPENDENCY_UNAVAILABLE
        assert result.retry_after_seconds is not None and result.retry_after_seconds > 0
        assert ("retry-after", "2") in result.trailing_metadata()
    assert writer.committed == []
    assert gc.stats.unavailable_submissions == 4
    assert gc.stats.rows == 0


async def test_the_database_clients_unavailable_is_passed_on_as_it_is() -> None:
    gave_up = ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        Reason.DEPENDENCY_UNAVAILABLE,
        "the database is unavailable, try again shortly",
        retry_after_seconds=7,
    )
    writer = PoisonWriter({"a": gave_up, "b": gave_up})
    gc = committer(writer, max_wait_seconds=0.05)
    results = await asyncio.gather(gc.submit(["a"]), gc.submit(["b"]), return_exceptions=True)
    assert list(results) == [gave_up, gave_up]


async def test_the_database_going_away_while_a_batch_is_split_fails_the_rest_unavailable() -> None:
    """The first half of a split batch commits; then the database is gone: the callers of the
    second half get UNAVAILABLE, never a success for rows that did not commit."""

    class Flaky(PoisonWriter):
        async def __call__(self, batch: Sequence[Sequence[str]]) -> list[str]:
            if len(self.writes) >= 2:  # the whole batch, then its first half
                self.writes.append([row for rows in batch for row in rows])
                raise asyncpg.AdminShutdownError("terminating connection")
            return await super().__call__(batch)

    writer = Flaky({"bad": lang_too_long()})
    gc = committer(writer, max_wait_seconds=0.05)
    names = ["ok-0", "ok-1", "ok-2", "bad"]
    results = await asyncio.gather(*(gc.submit([n]) for n in names), return_exceptions=True)
    assert results[:2] == ["ok-0", "ok-1"]
    assert writer.committed == ["ok-0", "ok-1"]
    for result in results[2:]:
        assert isinstance(result, ServiceError)
        assert result.code is grpc.StatusCode.UNAVAILABLE


async def test_a_writer_may_refuse_one_submission_without_failing_the_batch() -> None:
    refusal = ServiceError(grpc.StatusCode.ALREADY_EXISTS, Reason.INVALID_ARGUMENT, "taken")

    async def writer(batch: Sequence[Sequence[str]]) -> list[str | Exception]:
        return [refusal if rows == ["taken"] else rows[0] for rows in batch]

    gc = committer(writer, max_wait_seconds=0.05)
    results = await asyncio.gather(
        gc.submit(["a"]), gc.submit(["taken"]), gc.submit(["b"]), return_exceptions=True
    )
    assert list(results) == ["a", refusal, "b"]
    assert gc.stats.rows == 2
    assert gc.stats.refused_submissions == 1


async def test_a_value_the_driver_cannot_encode_is_the_callers_fault() -> None:
    writer = PoisonWriter({"huge": RefusedValue("value out of int16 range")})
    gc = committer(writer, max_wait_seconds=0.05)
    results = await asyncio.gather(gc.submit(["huge"]), gc.submit(["fine"]), return_exceptions=True)
    assert isinstance(results[0], ServiceError)
    assert results[0].code is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in results[0].violations] == ["request"]
    assert results[1] == "fine"


def test_errors_are_classified_by_sqlstate_class() -> None:
    missing_partition = asyncpg.CheckViolationError(
        'no partition of relation "funnel_events" found for row'
    )
    cases: list[tuple[BaseException, Failure]] = [
        (asyncpg.CheckViolationError("check"), Failure.CONTENT),  # 23514
        (asyncpg.NotNullViolationError("not null"), Failure.CONTENT),  # 23502
        (asyncpg.UniqueViolationError("unique"), Failure.CONTENT),  # 23505
        (asyncpg.CharacterNotInRepertoireError("NUL"), Failure.CONTENT),  # 22021
        (asyncpg.StringDataRightTruncationError("too long"), Failure.CONTENT),  # 22001
        (asyncpg.NumericValueOutOfRangeError("range"), Failure.CONTENT),  # 22003
        (RefusedValue("int16"), Failure.CONTENT),
        (missing_partition, Failure.UNAVAILABLE),  # a 23514 that is the server's trouble
        (asyncpg.ConnectionFailureError("gone"), Failure.UNAVAILABLE),  # 08006
        (asyncpg.AdminShutdownError("shutdown"), Failure.UNAVAILABLE),  # 57P01
        (asyncpg.CrashShutdownError("crash"), Failure.UNAVAILABLE),  # 57P02
        (asyncpg.CannotConnectNowError("starting"), Failure.UNAVAILABLE),  # 57P03
        (asyncpg.QueryCanceledError("timeout"), Failure.UNAVAILABLE),  # 57014
        (asyncpg.DiskFullError("disk full"), Failure.UNAVAILABLE),  # 53100
        (asyncpg.TooManyConnectionsError("too many"), Failure.UNAVAILABLE),  # 53300
        (asyncpg.SerializationError("serialize"), Failure.UNAVAILABLE),  # 40001
        (asyncpg.DeadlockDetectedError("deadlock"), Failure.UNAVAILABLE),  # 40P01
        (asyncpg.ConnectionDoesNotExistError("closed"), Failure.UNAVAILABLE),
        (asyncpg.InterfaceError("pool is closing"), Failure.UNAVAILABLE),
        (asyncpg.InternalClientError("cannot switch to state 15"), Failure.UNAVAILABLE),
        (ConnectionResetError(), Failure.UNAVAILABLE),
        (TimeoutError(), Failure.UNAVAILABLE),
        (asyncpg.UndefinedTableError("no such table"), Failure.OTHER),  # 42P01: a bug
        (RuntimeError("bug"), Failure.OTHER),
    ]
    for error, expected in cases:
        assert classify(error) is expected, (type(error).__name__, expected)
