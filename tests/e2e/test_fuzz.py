"""Property-based fuzzing of every REST route, through the real Envoy and the real services:
thousands of random requests per route, and not one may be answered with a 5xx.

The routes come from the descriptor set Envoy transcodes with (gen/genmesh.pb, the
`google.api.http` annotations), so a new route is fuzzed as soon as it exists. Each request
is one of:

- a fully random JSON value (anything: null, huge integers, NaN, unicode, control characters,
  nested lists and objects);
- an object shaped like the route's request message: its real field names (proto and JSON
  spellings), each with a value drawn from the field's protovalidate rules (pattern, `in`,
  email, uuid, lengths and ranges with their boundaries), from its type, or of a random other
  type, sometimes with unknown fields, so requests get past the JSON parser into validation
  and the handlers;
- malformed bytes (truncated JSON, deep nesting, invalid UTF-8);

and for GET routes, random query strings instead of bodies. Some requests carry an
Authorization header (garbage, or a correctly signed JWT with odd claims), another
content-type, or headers a client must not be able to use (identity, gRPC framing). Admin
routes mostly get the admin credential, so their bodies reach the admin handlers.

Every response must be below 500, carry the security headers, and be JSON (`code` and
`message` on a 4xx), or server-sent events for a 200 from the stream route. Hypothesis draws
the requests derandomized (every run sends the same ones); they are then sent concurrently,
to a mesh of the module's own (see `fuzz_mesh`). A failure lists every kind of wrong answer
with its smallest request."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import aiohttp
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import UNLIMITED, RunningMesh, mesh_config, running_mesh
from tests.e2e.fuzz.checks import (
    CONCURRENCY,
    Outcome,
    describe,
    failure_kind,
    field_violations,
    problems,
    send_all,
    size,
)
from tests.e2e.fuzz.requests import FuzzRequest, fuzz_request
from tests.e2e.fuzz.routes import Route, discover_routes

pytestmark = pytest.mark.e2e

BODIES_PER_ROUTE = 2000
BATCH = 40  # requests drawn per Hypothesis example
ROUTES = discover_routes()


def test_every_documented_route_is_fuzzed() -> None:
    """The discovery found the routes (a broken one would fuzz nothing, and pass)."""
    found = {(r.method, r.path) for r in ROUTES}
    assert {
        ("POST", "/api/generate"),
        ("POST", "/api/generate:stream"),
        ("POST", "/api/feedback"),
        ("POST", "/api/wishlist"),
        ("POST", "/api/events"),
        ("GET", "/api/quota"),
        ("GET", "/api/profile"),
        ("GET", "/api/health"),
        ("GET", "/api/admin/cache"),
        ("POST", "/api/admin/cache:invalidate"),
        ("GET", "/api/admin/performance"),
        ("GET", "/api/admin/blocks"),
        ("POST", "/api/admin/blocks:lift"),
    } <= found


@pytest.fixture(scope="module")
def fuzz_mesh(
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningMesh]:
    """A mesh of its own, as the session's but behind one trusted proxy (the test plays it, see
    `materialize`), so every request comes from its own client address. On the session's mesh
    everything comes from 127.0.0.1: the fuzzed failed admin attempts would get it blocked
    (admin_failures), for this module and every test after it, and guest quota would run
    out."""
    config = mesh_config(
        database_url,
        redis_url,
        f"{redis_prefix}fuzz:",
        tmp_path_factory.mktemp("fuzz-mesh-logs"),
        GATEWAY_TRUSTED_PROXY_HOPS="1",
        **UNLIMITED,
    )
    with running_mesh(config) as running:
        yield running


@pytest.fixture(scope="module")
def fuzz_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop of the module's own, driven from the synchronous tests (never set as the
    thread's current loop: the session's is left alone)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def fuzz_session(fuzz_loop: asyncio.AbstractEventLoop) -> Iterator[aiohttp.ClientSession]:
    """aiohttp rather than httpx: for thousands of small requests httpx's own CPU time (a
    few milliseconds a request) would be most of this module's."""

    async def make() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONCURRENCY),
            timeout=aiohttp.ClientTimeout(total=90),
        )

    session = fuzz_loop.run_until_complete(make())
    yield session
    fuzz_loop.run_until_complete(session.close())


DRAWN: dict[tuple[str, bool, str], list[FuzzRequest]] = {}


def draw_requests(route: Route) -> list[FuzzRequest]:
    """BODIES_PER_ROUTE requests, the same ones every run. Drawn before any is sent: drawing is
    CPU-bound and sending I/O-bound, and interleaved in one process they slow each other.
    Routes of the same shape (the stream and the plain generate, the GETs without fields) get
    the same requests: drawing is a good part of the time this module takes."""
    shape = (route.method, route.admin, route.message.full_name if route.message.fields else "")
    if shape not in DRAWN:
        DRAWN[shape] = draw_new_requests(route)
    return [replace(r, path=route.path) for r in DRAWN[shape]]


def draw_new_requests(route: Route) -> list[FuzzRequest]:
    drawn: list[FuzzRequest] = []

    @settings(
        max_examples=BODIES_PER_ROUTE // BATCH,
        deadline=None,
        derandomize=True,
        database=None,
        # Nothing fails in here (the test judges the answers), so nothing to shrink.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(fuzz_request(route), min_size=BATCH, max_size=BATCH))
    def draw(batch: list[FuzzRequest]) -> None:
        drawn.extend(batch)

    draw()
    return drawn


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_random_requests_never_get_a_5xx(
    route: Route,
    fuzz_mesh: RunningMesh,
    fuzz_session: aiohttp.ClientSession,
    fuzz_loop: asyncio.AbstractEventLoop,
) -> None:
    """Every wrong answer is collected, not only the first: a failure lists each kind of
    wrong answer with how often it happened and its smallest request (Hypothesis does not
    shrink: its shrinking would re-send thousands of requests)."""
    started = time.monotonic()
    requests = draw_requests(route)
    drawn = time.monotonic()
    outcomes = fuzz_loop.run_until_complete(send_all(fuzz_session, fuzz_mesh.url, requests))
    statuses = Counter(o.status for o in outcomes)
    failures: Counter[str] = Counter()
    smallest: dict[str, Outcome] = {}
    for outcome in outcomes:
        if found := problems(route, outcome):
            kind = failure_kind(found, outcome)
            failures[kind] += 1
            if kind not in smallest or size(outcome.request) < size(smallest[kind].request):
                smallest[kind] = outcome
    violations = [n for n in map(field_violations, outcomes) if n]
    print(
        f"\n{route.method} {route.path}: {len(outcomes)} requests, drawn in "
        f"{drawn - started:.1f}s, answered in {time.monotonic() - drawn:.1f}s; statuses "
        f"{dict(sorted(statuses.items()))}; {len(violations)} refused for fields "
        f"(at most {max(violations, default=0)} violations in one answer)"
    )
    assert not failures, f"{sum(failures.values())} wrong answers from {route.path}:\n" + "\n".join(
        f"{n} x {kind}\n  smallest: {describe(smallest[kind])}" for kind, n in failures.items()
    )
    assert len(outcomes) >= BODIES_PER_ROUTE
    # The requests reach the handlers (some succeed) and their validation (some are refused
    # for a field, not only by the JSON parser); quota exhaustion does not drown the rest.
    assert sum(n for s, n in statuses.items() if 200 <= s < 300) > 0, statuses
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) > 0, statuses
    if route.method == "POST":
        assert violations
    assert statuses[429] < len(outcomes) // 4, statuses
