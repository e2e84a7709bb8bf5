"""Idempotency keys of feedback and wishlist requests (the `Idempotency-Key` header, which
Envoy passes on as `idempotency-key` metadata): the service over a real channel, the store and
the key parsing, against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import asyncpg
import grpc
import pytest

from genmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.db import Database
from services.common.errors import Reason, ServiceError, error_info_from_call
from services.common.identity import Identity
from services.common.perf import PerformanceMonitor
from services.common.settings import PostgresSettings
from services.telemetry import records
from services.telemetry.app import TelemetryService, create_service
from services.telemetry.group_commit import BatchLimits
from services.telemetry.settings import TelemetrySettings
from services.telemetry.store import TelemetryStore

Metadata = tuple[tuple[str, str], ...]


@dataclass
class Running:
    service: TelemetryService
    stub: telemetry_pb2_grpc.TelemetryServiceAsyncStub


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
async def telemetry(database_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[Running]:
    settings = TelemetrySettings(
        grpc_port=0,
        metrics_port=0,
        database_url=database_url,
        redis_url=redis_url,
        redis_key_prefix=f"{redis_prefix}telemetry-{uuid.uuid4().hex[:8]}:",
        telemetry_batch_max_wait_ms=20,
        shutdown_grace_seconds=1,
        # Not probed by these tests; nothing listens there.
        generation_addr=f"127.0.0.1:{closed_port()}",
        quota_addr=f"127.0.0.1:{closed_port()}",
    )
    service = await create_service(settings)
    port = await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Running(service, telemetry_pb2_grpc.TelemetryServiceStub(channel))
    finally:
        await service.stop()


def user_metadata(key: str | None = None, user_id: str | None = None) -> Metadata:
    metadata: Metadata = (
        ("x-genmesh-user-id", user_id or f"user-{uuid.uuid4()}"),
        ("x-genmesh-client-ip", "198.51.100.20"),
    )
    return (*metadata, ("idempotency-key", key)) if key is not None else metadata


def guest_metadata(ip: str, key: str) -> Metadata:
    return (("x-genmesh-client-ip", ip), ("idempotency-key", key))


def feedback_request(comment: str, rating: int = 4) -> telemetry_pb2.SubmitFeedbackRequest:
    return telemetry_pb2.SubmitFeedbackRequest(rating=rating, comment=comment, lang="en")


async def feedback_rows(db: asyncpg.Connection, comment: str) -> list[uuid.UUID]:
    rows = await db.fetch("SELECT id FROM feedback WHERE comment = $1 ORDER BY created_at", comment)
    return [r["id"] for r in rows]


def refusal(err: grpc.aio.AioRpcError) -> ServiceError:
    info = error_info_from_call(cast(Any, tuple(err.trailing_metadata() or ())))
    assert info is not None, err
    return info


# -- through the service --------------------------------------------------------------------


async def test_a_retried_feedback_is_stored_once_and_answered_with_the_same_id(
    telemetry: Running, db: asyncpg.Connection
) -> None:
    comment = f"retried {uuid.uuid4()}"
    metadata = user_metadata(key=str(uuid.uuid4()))
    first = await telemetry.stub.SubmitFeedback(feedback_request(comment), metadata=metadata)
    again = await telemetry.stub.SubmitFeedback(feedback_request(comment), metadata=metadata)
    assert again.feedback_id == first.feedback_id
    assert await feedback_rows(db, comment) == [uuid.UUID(first.feedback_id)]


async def test_concurrent_retries_share_one_row_and_one_answer(
    telemetry: Running, db: asyncpg.Connection
) -> None:
    comment = f"concurrent {uuid.uuid4()}"
    metadata = user_metadata(key=str(uuid.uuid4()))
    replies = await asyncio.gather(
        *(
            telemetry.stub.SubmitFeedback(feedback_request(comment), metadata=metadata)
            for _ in range(8)
        )
    )
    ids = {r.feedback_id for r in replies}
    assert len(ids) == 1
    assert await feedback_rows(db, comment) == [uuid.UUID(ids.pop())]


async def test_the_same_key_with_another_body_is_refused(
    telemetry: Running, db: asyncpg.Connection
) -> None:
    comment = f"original {uuid.uuid4()}"
    metadata = user_metadata(key="order-42")
    first = await telemetry.stub.SubmitFeedback(feedback_request(comment), metadata=metadata)
    for other in (feedback_request(comment, rating=5), feedback_request(comment + " edited")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await telemetry.stub.SubmitFeedback(other, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS  # HTTP 409 through Envoy
        info = refusal(caught.value)
        assert info.reason is Reason.INVALID_ARGUMENT
        assert [v.field for v in info.violations] == ["Idempotency-Key"]
        trailers = cast(Metadata, tuple(caught.value.trailing_metadata() or ()))
        assert not any(k == "retry-after" for k, _ in trailers)
    # The refusals stored nothing, and the key still answers its own request.
    assert await feedback_rows(db, comment + " edited") == []
    again = await telemetry.stub.SubmitFeedback(feedback_request(comment), metadata=metadata)
    assert again.feedback_id == first.feedback_id
    assert await feedback_rows(db, comment) == [uuid.UUID(first.feedback_id)]


async def test_different_callers_use_the_same_key_independently(
    telemetry: Running, db: asyncpg.Connection
) -> None:
    comment = f"shared key {uuid.uuid4()}"
    key = "same-key-for-everyone"
    callers = [
        user_metadata(key=key),
        user_metadata(key=key),
        guest_metadata("203.0.113.5", key),
        guest_metadata("203.0.113.6", key),
        guest_metadata("2001:db8:1:2::1", key),
    ]
    replies = [
        await telemetry.stub.SubmitFeedback(feedback_request(comment), metadata=m) for m in callers
    ]
    ids = [uuid.UUID(r.feedback_id) for r in replies]
    assert len(set(ids)) == len(callers)
    assert sorted(await feedback_rows(db, comment)) == sorted(ids)
    # A guest is its client network: another address of the same IPv6 /64 retrying is the
    # same caller (a new privacy address between retries).
    moved = await telemetry.stub.SubmitFeedback(
        feedback_request(comment), metadata=guest_metadata("2001:db8:1:2::abcd", key)
    )
    assert uuid.UUID(moved.feedback_id) == ids[-1]


async def test_a_wishlist_retry_with_a_key_is_answered_as_the_first_time(
    telemetry: Running, db: asyncpg.Connection
) -> None:
    email = f"pro-{uuid.uuid4().hex[:10]}@example.com"
    request = telemetry_pb2.JoinWishlistRequest(email=email, lang="en")
    user_id = f"user-{uuid.uuid4()}"
    keyed = user_metadata(key=str(uuid.uuid4()), user_id=user_id)
    first = await telemetry.stub.JoinWishlist(request, metadata=keyed)
    again = await telemetry.stub.JoinWishlist(request, metadata=keyed)
    assert (first.created, again.created) == (True, True)
    # Idempotent per email as before: without the key (or with a new one), it is not new.
    unkeyed = await telemetry.stub.JoinWishlist(request, metadata=user_metadata(user_id=user_id))
    other_key = await telemetry.stub.JoinWishlist(
        request, metadata=user_metadata(key=str(uuid.uuid4()), user_id=user_id)
    )
    assert (unkeyed.created, other_key.created) == (False, False)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await telemetry.stub.JoinWishlist(
            telemetry_pb2.JoinWishlistRequest(email="other-" + email, lang="en"), metadata=keyed
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert [v.field for v in refusal(caught.value).violations] == ["Idempotency-Key"]
    count = await db.fetchval(
        "SELECT count(*) FROM pro_wishlist WHERE lower(email) IN (lower($1), lower($2))",
        email,
        "other-" + email,
    )
    assert count == 1


async def test_a_key_is_scoped_to_its_route(telemetry: Running) -> None:
    key = str(uuid.uuid4())
    user_id = f"user-{uuid.uuid4()}"
    metadata = user_metadata(key=key, user_id=user_id)
    await telemetry.stub.SubmitFeedback(feedback_request("route scope"), metadata=metadata)
    joined = await telemetry.stub.JoinWishlist(
        telemetry_pb2.JoinWishlistRequest(email=f"r-{uuid.uuid4().hex[:8]}@example.com"),
        metadata=metadata,
    )
    assert joined.created is True


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "printable ASCII"),
        ("k" * 256, "printable ASCII"),
        ('"unterminated', "quoted string"),
        ('""', "printable ASCII"),
    ],
    ids=["empty", "too-long", "bad-quoting", "empty-quoted"],
)
async def test_a_bad_key_is_refused_naming_the_header(
    telemetry: Running, db: asyncpg.Connection, value: str, problem: str
) -> None:
    comment = f"bad key {uuid.uuid4()}"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await telemetry.stub.SubmitFeedback(
            feedback_request(comment), metadata=user_metadata(key=value)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [violation] = refusal(caught.value).violations
    assert violation.field == "Idempotency-Key"
    assert problem in violation.description
    assert await feedback_rows(db, comment) == []


async def test_a_key_sent_twice_is_refused(telemetry: Running) -> None:
    metadata = (*user_metadata(key="a"), ("idempotency-key", "b"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await telemetry.stub.SubmitFeedback(feedback_request("twice"), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in refusal(caught.value).violations] == ["Idempotency-Key"]


async def test_the_longest_key_and_a_quoted_key_are_accepted(telemetry: Running) -> None:
    longest = "~" * 254 + "!"
    user_id = f"user-{uuid.uuid4()}"
    first = await telemetry.stub.SubmitFeedback(
        feedback_request("longest"), metadata=user_metadata(key=longest, user_id=user_id)
    )
    # The draft's form, a Structured Field String, is the same key as its content.
    quoted = await telemetry.stub.SubmitFeedback(
        feedback_request("longest"), metadata=user_metadata(key=f'"{longest}"', user_id=user_id)
    )
    assert quoted.feedback_id == first.feedback_id


# -- the store ------------------------------------------------------------------------------


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = Database(PostgresSettings(DATABASE_URL=database_url), PerformanceMonitor())
    try:
        yield db
    finally:
        await db.close()


def keyed_row(key: str, comment: str) -> records.FeedbackRow:
    who = Identity(user_id="store-user", email="", client_ip="192.0.2.1")
    request = feedback_request(comment)
    idempotency = records.idempotency_key(
        (("idempotency-key", key),), records.FEEDBACK_ROUTE, who, request
    )
    return records.feedback_row(request, who, idempotency)


async def test_an_expired_key_is_a_new_request_and_is_pruned(
    database: Database, db: asyncpg.Connection
) -> None:
    store = TelemetryStore(database, BatchLimits(max_wait_seconds=0), idempotency_ttl=timedelta(0))
    key, comment = str(uuid.uuid4()), f"expired {uuid.uuid4()}"
    try:
        first = await store.submit_feedback(keyed_row(key, comment))
        second = await store.submit_feedback(keyed_row(key, comment))
        assert first != second  # the window is over: the key is claimed afresh
        assert sorted(await feedback_rows(db, comment)) == sorted([first, second])
        answer = await db.fetchval(
            "SELECT response::text FROM idempotency_keys WHERE idempotency_key = $1", key
        )
        assert json.loads(answer) == {"feedback_id": str(second)}
        assert await store.prune_idempotency_keys() >= 1
        left = await db.fetchval(
            "SELECT count(*) FROM idempotency_keys WHERE idempotency_key = $1", key
        )
        assert left == 0
    finally:
        await store.close()


async def test_a_batch_written_again_after_a_lost_commit_is_not_stored_twice(
    database: Database, db: asyncpg.Connection
) -> None:
    """The database client repeats a transaction whose connection was lost; if the commit
    had in fact gone through, the keyed rows are found, not written again."""
    store = TelemetryStore(database, BatchLimits(max_wait_seconds=0))
    row = keyed_row(str(uuid.uuid4()), f"lost ack {uuid.uuid4()}")
    try:
        assert await store._write_feedback([[row]]) == [row.id]
        assert await store._write_feedback([[row]]) == [row.id]
        assert await feedback_rows(db, row.comment) == [row.id]
    finally:
        await store.close()


async def test_retries_in_one_batch_are_answered_from_the_first(
    database: Database, db: asyncpg.Connection
) -> None:
    store = TelemetryStore(database, BatchLimits(max_wait_seconds=0.1))
    key, comment = str(uuid.uuid4()), f"one batch {uuid.uuid4()}"
    try:
        results = await asyncio.gather(
            store.submit_feedback(keyed_row(key, comment)),
            store.submit_feedback(keyed_row(key, comment)),
            store.submit_feedback(keyed_row(key, comment + " other")),
            return_exceptions=True,
        )
        assert store.feedback.stats.largest_batch_submissions == 3
        assert results[0] == results[1]
        assert isinstance(results[2], ServiceError)
        assert results[2].code is grpc.StatusCode.ALREADY_EXISTS
        assert await feedback_rows(db, comment) == [results[0]]
    finally:
        await store.close()


# -- parsing the header ---------------------------------------------------------------------

USER = Identity(user_id="u-1", email="", client_ip="198.51.100.1")


def parse(value: str, who: Identity = USER) -> records.IdempotencyKey | None:
    return records.idempotency_key(
        (("idempotency-key", value),), records.FEEDBACK_ROUTE, who, feedback_request("x")
    )


def test_keys_are_parsed_bare_or_quoted_and_scoped_to_the_caller() -> None:
    assert records.idempotency_key((), records.FEEDBACK_ROUTE, USER, feedback_request("x")) is None
    bare = parse("abc 123")
    assert bare is not None
    assert (bare.route, bare.scope, bare.key) == ("SubmitFeedback", "user:u-1", "abc 123")
    quoted = parse(r'"a \"quoted\" \\ key"')
    assert quoted is not None and quoted.key == r'a "quoted" \ key'
    scopes = {
        ip: getattr(parse("k", Identity("", "", ip)), "scope", None)
        for ip in ("203.0.113.9", "2001:db8:1:2:3:4:5:6", "::ffff:203.0.113.9")
    }
    assert scopes == {
        "203.0.113.9": "guest:203.0.113.9",
        "2001:db8:1:2:3:4:5:6": "guest:2001:db8:1:2::/64",
        "::ffff:203.0.113.9": "guest:203.0.113.9",
    }


@pytest.mark.parametrize("value", ["", "k" * 256, "tab\tkey", "caf\u00e9", "nul\x00", '"a\\b"'])
def test_keys_outside_printable_ascii_are_refused(value: str) -> None:
    with pytest.raises(ServiceError) as caught:
        parse(value)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in caught.value.violations] == ["Idempotency-Key"]


def test_the_fingerprint_is_the_payload_however_it_is_spelled() -> None:
    a = telemetry_pb2.SubmitFeedbackRequest(rating=3, comment="")
    b = telemetry_pb2.SubmitFeedbackRequest(rating=3)
    c = telemetry_pb2.SubmitFeedbackRequest(rating=3, comment=" ")
    assert records.fingerprint(a) == records.fingerprint(b)
    assert records.fingerprint(a) != records.fingerprint(c)
    assert len(records.fingerprint(a)) == 32
