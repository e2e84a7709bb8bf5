"""Group commit: concurrent submissions are gathered into one batch, the batch is written in
ONE call of the writer (one transaction), and each submitter is answered only after that write
returned, with its own result (or its own refusal, see `BatchWriter`).

A submission (the rows of one request) is never split across batches, so a request is
all-or-nothing. A batch holds at most `max_rows` rows, except that a single larger submission
goes alone. The first submission of a batch waits at most `max_wait` seconds for company; while
`max_in_flight` batches are being written, new submissions gather for the next one.

When a write fails, what the callers learn depends on why (`classify`):

- because of what the batch holds (a value or a constraint PostgreSQL refuses: SQLSTATE classes
  22 and 23): the batch is split in halves and each half written in its own transaction, down to
  single submissions. Only the submissions whose rows cause the failure fail, with
  INVALID_ARGUMENT naming the field where the error says which; the others commit and succeed.
- because the database is away (connection lost or refused, timeouts, shutdown, too many
  connections, serialization failures: classes 08, 40, 53, 57, 58): every caller of the batch
  gets UNAVAILABLE with a retry delay. Nothing of it was committed (the transaction rolled back;
  a commit whose acknowledgement was lost is the one case where a caller told to retry had in
  fact committed, which is why requests carry idempotency keys or event ids).
- anything else (a bug): every caller gets the error as it is (INTERNAL to clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import asyncpg
import grpc
from prometheus_client import Counter, Histogram

from services.common.db import database_unavailable
from services.common.errors import FieldViolation, Reason, ServiceError, invalid_argument

log = logging.getLogger(__name__)

RowT = TypeVar("RowT")
ResultT = TypeVar("ResultT")

# The writer gets one sequence of rows per submission and returns one result per submission,
# in the same order. It must write everything in one transaction, or raise. A result that is an
# exception refuses that submission alone (its caller gets it raised; nothing of it was
# written), for refusals the writer decides itself, like an idempotency key reused with
# another request.
BatchWriter = Callable[[Sequence[Sequence[RowT]]], Awaitable[Sequence[ResultT | Exception]]]

BATCH_ROWS = Histogram(
    "telemetry_batch_rows",
    "Rows per group-commit batch.",
    ["committer"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
)
BATCH_SUBMISSIONS = Histogram(
    "telemetry_batch_submissions",
    "Requests per group-commit batch.",
    ["committer"],
    buckets=(1, 2, 3, 5, 10, 25, 50, 100, 250),
)
REJECTED = Counter(
    "telemetry_batch_rejected_total",
    "Submissions refused because too many rows were waiting.",
    ["committer"],
)
BATCHES = Counter(
    "telemetry_batches_total", "Group-commit batches written, by outcome.", ["committer", "outcome"]
)
SPLITS = Counter(
    "telemetry_batch_splits_total",
    "Batches split in halves because their content made the write fail.",
    ["committer"],
)


class Failure(enum.Enum):
    """Why a write failed, as far as its callers are concerned."""

    # What the rows hold: only the submissions that hold it must fail.
    CONTENT = "content"
    # The database is away or overloaded: nothing was committed, the caller may retry.
    UNAVAILABLE = "unavailable"
    # Anything else: a bug; the callers get the error as it is.
    OTHER = "other"


class RefusedValue(Exception):
    """A row value the driver could not encode (an integer out of its column's range, a wrong
    type). Writers raise it in place of asyncpg's client-side errors, some of which are
    InterfaceErrors that the database client would otherwise retry as transient."""


# SQLSTATE classes (the first two characters).
_CONTENT_CLASSES = frozenset({"22", "23"})  # data exception, integrity constraint violation
_UNAVAILABLE_CLASSES = frozenset(
    {
        "08",  # connection exception
        "40",  # transaction rollback: serialization failure, deadlock
        "53",  # insufficient resources: disk full, out of memory, too many connections
        "57",  # operator intervention: query canceled (statement timeout), admin shutdown,
        #        crash shutdown, cannot connect now
        "58",  # system error: I/O error
    }
)
_UNAVAILABLE_STATES = frozenset({"25P03"})  # idle-in-transaction session timeout


def classify(err: BaseException) -> Failure:
    """Content, unavailable or other: see the module's docstring."""
    if isinstance(err, ServiceError):
        # The database client gave up on a transient failure (UNAVAILABLE), or a refusal.
        unavailable = err.code is grpc.StatusCode.UNAVAILABLE
        return Failure.UNAVAILABLE if unavailable else Failure.OTHER
    if isinstance(err, asyncpg.PostgresError):
        return _classify_sqlstate(err)
    if isinstance(err, RefusedValue) or (
        # asyncpg's DataError: invalid input for a query argument, refused before sending.
        isinstance(err, asyncpg.InterfaceError) and isinstance(err, ValueError)
    ):
        return Failure.CONTENT
    if isinstance(
        err, OSError | TimeoutError | asyncpg.InterfaceError | asyncpg.InternalClientError
    ):
        # Connection refused or reset, a timeout, a connection closed under the pool, or a
        # connection left in a state it cannot go on from ("cannot switch to state ...; another
        # operation is in progress", seen when the server shuts down mid-statement).
        return Failure.UNAVAILABLE
    return Failure.OTHER


def _classify_sqlstate(err: asyncpg.PostgresError) -> Failure:
    state = str(err.sqlstate or "")
    if _missing_partition(err):
        # A row with no partition for its month: the retention job has not created it, which
        # is the server's trouble, not the caller's (it is a 23514 all the same).
        return Failure.UNAVAILABLE
    if state[:2] in _CONTENT_CLASSES:
        return Failure.CONTENT
    if state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_STATES:
        return Failure.UNAVAILABLE
    return Failure.OTHER


def _missing_partition(err: asyncpg.PostgresError) -> bool:
    return (
        err.sqlstate == "23514"
        and not getattr(err, "constraint_name", None)
        and str(getattr(err, "message", "") or err).startswith("no partition of relation")
    )


@dataclass(frozen=True)
class ContentFields:
    """How a content failure is reported: the request field each column comes from, and the
    field named when the error names no known column."""

    columns: Mapping[str, str]
    default: str


# What a refused value's SQLSTATE says about it, for the caller.
_CONTENT_DESCRIPTIONS: dict[str, str] = {
    "22001": "is too long for the database",
    "22003": "is out of the range the database stores",
    "22021": "contains characters the database cannot store (such as NUL)",
    "22P02": "is not in a form the database accepts",
    "22P05": "contains characters the database cannot store",
    "23502": "is required",
    "23503": "refers to something that does not exist",
    "23505": "is already taken",
    "23514": "is outside what the database accepts",
}
_CONTEXT_COLUMN = re.compile(r"\bcolumn (\w+)")


def content_error(err: BaseException, fields: ContentFields) -> ServiceError:
    """INVALID_ARGUMENT for a submission whose rows the database refused, naming the field
    when the error says which column."""
    state = str(getattr(err, "sqlstate", "") or "")
    column = _column_of(err, fields.columns)
    field = fields.columns.get(column, fields.default) if column else fields.default
    description = _CONTENT_DESCRIPTIONS.get(state, "is a value the database refused")
    if column and field != column:
        description = f"{column} {description}"
    return invalid_argument(FieldViolation(field, description))


def _column_of(err: BaseException, known: Mapping[str, str]) -> str | None:
    """The column the database (or the driver) blamed: the error's column, the column a COPY
    was reading, or a known column in the violated constraint's name."""
    column = getattr(err, "column_name", None)
    if column:
        return str(column)
    match = _CONTEXT_COLUMN.search(str(getattr(err, "context", "") or ""))
    if match:
        return match.group(1)
    constraint = getattr(err, "constraint_name", None)
    if constraint:
        # 0001 names checks <table>_<column>_check (partitions keep those names).
        padded = f"_{constraint}_"
        named = [c for c in known if f"_{c}_" in padded]
        if named:
            return max(named, key=len)
    return None


def failure_error(err: Exception, failure: Failure, fields: ContentFields) -> Exception:
    """What the callers of a failed write (of one submission, for CONTENT) are told."""
    if failure is Failure.CONTENT:
        return content_error(err, fields)
    if failure is Failure.UNAVAILABLE:
        if isinstance(err, ServiceError):
            return err
        return database_unavailable()
    return err


@dataclass(frozen=True)
class BatchLimits:
    # Rows one batch holds at most (a single larger submission still goes, alone).
    max_rows: int = 500
    # How long the first submission of a batch waits for company.
    max_wait_seconds: float = 0.005
    # Batches being written at once.
    max_in_flight: int = 1
    # Rows allowed to wait for a batch; beyond that (the database cannot keep up) new
    # submissions fail fast with UNAVAILABLE instead of queueing without bound.
    max_pending_rows: int = 10_000

    def __post_init__(self) -> None:
        if min(self.max_rows, self.max_in_flight, self.max_pending_rows) < 1:
            raise ValueError("max_rows, max_in_flight and max_pending_rows must be >= 1")
        if self.max_wait_seconds < 0:
            raise ValueError("max_wait_seconds must be >= 0")


DEFAULT_LIMITS = BatchLimits()


@dataclass
class CommitterStats:
    """Running totals, for health reports and for tests to observe batching. `batches` counts
    writes (transactions): a batch split because of its content counts once for the failed
    write and once for each of its halves' writes."""

    batches: int = 0
    failed_batches: int = 0
    submissions: int = 0
    # Rows committed.
    rows: int = 0
    # Batches that carried more than one submission: proof that group commit happened.
    shared_batches: int = 0
    largest_batch_submissions: int = 0
    # Submissions refused because too many rows were already waiting.
    rejected_submissions: int = 0
    # Batches split in halves because their content made the write fail.
    split_batches: int = 0
    # Submissions refused because of what their rows hold (the database refused them), or by
    # the writer (an exception as their result).
    refused_submissions: int = 0
    # Submissions answered UNAVAILABLE because the database was away.
    unavailable_submissions: int = 0


@dataclass
class _Submission(Generic[RowT, ResultT]):
    rows: Sequence[RowT]
    future: asyncio.Future[ResultT]
    arrived: float


class GroupCommitter(Generic[RowT, ResultT]):
    def __init__(
        self,
        name: str,
        writer: BatchWriter[RowT, ResultT],
        limits: BatchLimits = DEFAULT_LIMITS,
        fields: ContentFields | None = None,
    ) -> None:
        self.name = name
        self.fields = fields or ContentFields({}, default=name)
        self.max_rows = limits.max_rows
        self.max_wait_seconds = limits.max_wait_seconds
        self.max_pending_rows = limits.max_pending_rows
        self.stats = CommitterStats()
        self._writer = writer
        self._pending: deque[_Submission[RowT, ResultT]] = deque()
        self._pending_rows = 0
        self._full = asyncio.Event()
        self._slots = asyncio.Semaphore(limits.max_in_flight)
        self._leader: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._closed = False

    async def submit(self, rows: Sequence[RowT]) -> ResultT:
        """Queue `rows` for the next batch and return this submission's result once its rows are
        committed. Raises INVALID_ARGUMENT if the database refused its rows, UNAVAILABLE (with a
        retry delay) if the database is away, the writer's refusal of it, or, for any other
        failure, the writer's error."""
        if self._closed:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.OVERLOADED,
                "the service is shutting down, try again",
                retry_after_seconds=1,
            )
        if self._pending and self._pending_rows + len(rows) > self.max_pending_rows:
            self.stats.rejected_submissions += 1
            REJECTED.labels(self.name).inc()
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.OVERLOADED,
                "too many writes are waiting for the database, try again shortly",
                retry_after_seconds=1,
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ResultT] = loop.create_future()
        self._pending.append(_Submission(list(rows), future, loop.time()))
        self._pending_rows += len(rows)
        if self._pending_rows >= self.max_rows:
            self._full.set()
        if self._leader is None or self._leader.done():
            self._leader = asyncio.create_task(self._lead(), name=f"group-commit-{self.name}")
        # A cancelled caller cancels its future; _take() then drops its rows if not yet taken.
        return await future

    async def close(self) -> None:
        """Refuse new submissions, write the pending ones, and wait for every write."""
        self._closed = True
        if self._leader is not None:
            await self._leader
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def _lead(self) -> None:
        """Form batches while submissions are pending, one at a time, each as soon as it is
        full or its first submission has waited `max_wait_seconds`, and a write slot is free."""
        loop = asyncio.get_running_loop()
        while self._pending:
            if self._pending_rows < self.max_rows:
                self._full.clear()
                wait = self._pending[0].arrived + self.max_wait_seconds - loop.time()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._full.wait()
            # Submissions arriving while every slot is busy join this batch.
            await self._slots.acquire()
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._write(batch), name=f"group-commit-{self.name}-write")
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    def _take(self) -> list[_Submission[RowT, ResultT]]:
        batch: list[_Submission[RowT, ResultT]] = []
        rows = 0
        while self._pending:
            head = self._pending[0]
            if head.future.done():  # its caller went away before the write: skip its rows
                self._pending.popleft()
                self._pending_rows -= len(head.rows)
                continue
            if batch and rows + len(head.rows) > self.max_rows:
                break
            self._pending.popleft()
            self._pending_rows -= len(head.rows)
            batch.append(head)
            rows += len(head.rows)
        return batch

    async def _write(self, batch: list[_Submission[RowT, ResultT]]) -> None:
        self.stats.submissions += len(batch)
        try:
            await self._write_part(batch)
        except asyncio.CancelledError:
            # Also the submissions of halves not written yet: none may wait forever.
            for s in batch:
                s.future.cancel()
            raise
        finally:
            self._slots.release()

    async def _write_part(self, batch: list[_Submission[RowT, ResultT]]) -> None:
        """Write `batch` in one transaction; if its content makes that fail, write each half
        on its own, down to the single submissions that cause it."""
        rows = sum(len(s.rows) for s in batch)
        try:
            results = await self._writer([s.rows for s in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name} writer returned {len(results)} results for {len(batch)} requests"
                )
        except Exception as err:
            failure = classify(err)
            self._count(batch, rows, ok=False)
            if failure is Failure.CONTENT and len(batch) > 1:
                await self._split(batch, rows, err)
            else:
                self._fail(batch, rows, err, failure)
        else:
            self._deliver(batch, results)

    async def _split(
        self, batch: list[_Submission[RowT, ResultT]], rows: int, err: Exception
    ) -> None:
        log.info(
            "group commit batch refused by the database, splitting it: %s",
            err,
            extra={"committer": self.name, "requests": len(batch), "rows": rows},
        )
        self.stats.split_batches += 1
        SPLITS.labels(self.name).inc()
        half = len(batch) // 2
        for part in (batch[:half], batch[half:]):
            # A caller that went away meanwhile is not written for (as in _take()).
            live = [s for s in part if not s.future.done()]
            if live:
                await self._write_part(live)

    def _fail(
        self, batch: list[_Submission[RowT, ResultT]], rows: int, err: Exception, failure: Failure
    ) -> None:
        log.warning(
            "group commit batch failed (%s): %s",
            failure.value,
            err,
            extra={
                "committer": self.name,
                "requests": len(batch),
                "rows": rows,
                "sqlstate": getattr(err, "sqlstate", None),
            },
        )
        error = failure_error(err, failure, self.fields)
        if failure is Failure.CONTENT:
            self.stats.refused_submissions += len(batch)
        elif failure is Failure.UNAVAILABLE:
            self.stats.unavailable_submissions += len(batch)
        for s in batch:
            if not s.future.done():
                s.future.set_exception(error)

    def _deliver(
        self, batch: list[_Submission[RowT, ResultT]], results: Sequence[ResultT | Exception]
    ) -> None:
        refused = [isinstance(r, Exception) for r in results]
        self.stats.refused_submissions += sum(refused)
        written = sum(len(s.rows) for s, no in zip(batch, refused, strict=True) if not no)
        self._count(batch, written, ok=True)
        for s, result in zip(batch, results, strict=True):
            if s.future.done():
                continue
            if isinstance(result, Exception):
                s.future.set_exception(result)
            else:
                s.future.set_result(result)

    def _count(self, batch: list[_Submission[RowT, ResultT]], rows: int, *, ok: bool) -> None:
        stats = self.stats
        stats.batches += 1
        if ok:
            stats.rows += rows
        else:
            stats.failed_batches += 1
        if len(batch) > 1:
            stats.shared_batches += 1
        stats.largest_batch_submissions = max(stats.largest_batch_submissions, len(batch))
        BATCHES.labels(self.name, "ok" if ok else "error").inc()
        BATCH_ROWS.labels(self.name).observe(rows)
        BATCH_SUBMISSIONS.labels(self.name).observe(len(batch))
