"""Idempotency-Key through the real Envoy: the header reaches telemetry as `idempotency-key`
metadata, a retried feedback is stored once and answered with the same id, and a key reused
with another body is a 409."""

from __future__ import annotations

import uuid

import asyncpg
import httpx
import pytest

from tests.e2e.helpers import violated_fields

pytestmark = pytest.mark.e2e


async def feedback_ids(database_url: str, comment: str) -> list[uuid.UUID]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id FROM feedback WHERE comment = $1", comment)
    finally:
        await conn.close()
    return [r["id"] for r in rows]


async def test_a_retried_feedback_with_the_same_idempotency_key_is_stored_once(
    http: httpx.Client, database_url: str
) -> None:
    comment = f"idempotent {uuid.uuid4()}"
    body = {"rating": 5, "comment": comment, "lang": "en"}
    headers = {"Idempotency-Key": f'"{uuid.uuid4()}"'}  # the draft's quoted form

    first = http.post("/api/feedback", json=body, headers=headers)
    again = http.post("/api/feedback", json=body, headers=headers)
    assert first.status_code == 200, first.text
    assert again.status_code == 200, again.text
    assert again.json()["feedback_id"] == first.json()["feedback_id"]
    assert await feedback_ids(database_url, comment) == [uuid.UUID(first.json()["feedback_id"])]

    # The same key with another body: refused, nothing stored.
    other = http.post("/api/feedback", json={**body, "rating": 1}, headers=headers)
    assert other.status_code == 409, other.text
    assert violated_fields(other) == {"Idempotency-Key"}
    assert await feedback_ids(database_url, comment) == [uuid.UUID(first.json()["feedback_id"])]

    # A key that is not 1 to 255 printable ASCII characters: 400 naming the header.
    bad = http.post("/api/feedback", json=body, headers={"Idempotency-Key": "k" * 256})
    assert bad.status_code == 400, bad.text
    assert violated_fields(bad) == {"Idempotency-Key"}
