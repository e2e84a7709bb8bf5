"""Sending the fuzzed requests, and judging the answers: below 500, with the security headers,
JSON (`code` and `message` on a 4xx) or, from the stream route, server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import yarl

from tests.e2e.fuzz.requests import FuzzRequest, materialize
from tests.e2e.fuzz.routes import Route

CONCURRENCY = 64  # requests in flight at once


@dataclass
class Outcome:
    request: FuzzRequest
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    body: bytes = b""
    error: str = ""


async def send(session: aiohttp.ClientSession, base_url: str, request: FuzzRequest) -> Outcome:
    """One request, exactly as drawn: the target is not re-quoted, and no content-type is
    added to a body sent without one."""
    try:
        async with session.request(
            request.method,
            yarl.URL(base_url + request.target, encoded=True),
            headers=materialize(request),
            data=request.content,
            skip_auto_headers=("Content-Type",),
        ) as response:
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome(request, error=f"{type(exc).__name__}: {exc}")
    headers = {name.lower(): value for name, value in response.headers.items()}
    return Outcome(request, response.status, headers, body)


def problems(route: Route, outcome: Outcome) -> list[str]:
    """What is wrong with the answer to one request (nothing, hopefully)."""
    if outcome.error:
        return [f"no answer: {outcome.error}"]
    found = []
    if outcome.status >= 500:
        found.append(f"status {outcome.status}")
    if outcome.headers.get("x-content-type-options") != "nosniff":
        found.append("no x-content-type-options: nosniff")
    if "content-security-policy" not in outcome.headers:
        found.append("no content-security-policy")
    content_type = outcome.headers.get("content-type", "")
    if route.streaming and outcome.status == 200:
        if not content_type.startswith("text/event-stream"):
            found.append(f"stream answered {content_type!r}")
        events = [
            line.removeprefix(b"data:")
            for line in outcome.body.splitlines()
            if line.startswith(b"data:")
        ]
        try:
            parsed = [json.loads(e) for e in events]
        except ValueError:
            found.append("an SSE event is not JSON")
        else:
            if not parsed or not ({"done", "error"} & set(parsed[-1])):
                found.append("the stream does not end with done or error")
        return found
    try:
        body = json.loads(outcome.body)
    except ValueError:
        found.append(f"body is not JSON ({content_type!r})")
        return found
    if not content_type.startswith("application/json"):
        found.append(f"JSON body sent as {content_type!r}")
    if 400 <= outcome.status < 500 and not (
        isinstance(body, dict) and "code" in body and "message" in body
    ):
        found.append("4xx body without code and message")
    return found


def describe(outcome: Outcome) -> str:
    r = outcome.request
    body = outcome.body[:1500].decode("utf-8", "replace")
    content = (r.content or b"")[:1500]
    return (
        f"{r.method} {r.target}\n  request headers: {r.headers}\n  request body ({r.note}): "
        f"{content!r}\n  -> {outcome.status or outcome.error} {body}"
    )


def field_violations(outcome: Outcome) -> int:
    """How many field violations the answer's google.rpc.BadRequest lists."""
    try:
        details = json.loads(outcome.body).get("details", [])
    except (ValueError, AttributeError):
        return 0
    count = 0
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and str(detail.get("@type")).endswith("rpc.BadRequest"):
            count += len(detail.get("field_violations") or detail.get("fieldViolations") or [])
    return count


async def send_all(
    session: aiohttp.ClientSession, base_url: str, requests: Sequence[FuzzRequest]
) -> list[Outcome]:
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(request: FuzzRequest) -> Outcome:
        async with slots:
            return await send(session, base_url, request)

    return list(await asyncio.gather(*(one(r) for r in requests)))


def failure_kind(found: list[str], outcome: Outcome) -> str:
    """Answers that are wrong the same way group together: the problems, the status and the
    start of the error message."""
    try:
        message = str(json.loads(outcome.body).get("message", ""))
    except (ValueError, AttributeError):
        message = outcome.body[:60].decode("utf-8", "replace")
    return f"{'; '.join(found)} ({outcome.status or outcome.error}: {message[:60]!r})"


def size(request: FuzzRequest) -> int:
    return len(request.target) + len(request.content or b"") + len(repr(request.headers))
