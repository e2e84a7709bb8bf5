"""What a fuzzed request is, and the Hypothesis strategy that draws one for a route: a body or
a query string, and headers (the admin credential, a token or garbage Authorization, another
content-type, headers a client must not be able to use). Tokens are signed, and client
addresses given out, only when the request is sent (`materialize`)."""

from __future__ import annotations

import itertools
import string
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlencode

from hypothesis import strategies as st

from tests.e2e.conftest import ADMIN_TOKEN
from tests.e2e.fuzz.bodies import post_body
from tests.e2e.fuzz.routes import Route
from tests.e2e.fuzz.tokens import TOKENS, Token
from tests.e2e.fuzz.values import any_text, chance, weighted

RUN = uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class FuzzRequest:
    method: str
    query: str  # sent as is
    headers: tuple[tuple[str, str | Token], ...] = ()
    content: bytes | None = None
    note: str = field(default="", compare=False)
    path: str = ""

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


# -- headers -------------------------------------------------------------------------------

HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E) | st.just(" "), max_size=40
).map(str.strip)
GARBAGE_AUTH = st.one_of(
    HEADER_TEXT.map(lambda s: f"Bearer {s}".strip()),
    st.sampled_from(
        [
            "Bearer",
            "Bearer a.b.c",
            "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.",
            "bearer x",
            "Basic YWRtaW46YWRtaW4=",
            "Bearer " + "A" * 8000,
        ]
    ),
)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        "APPLICATION/JSON",
        "application/grpc-web+json",
        "application/xml",
        "*/*",
        "",
    ]
)
# Headers a client must not be able to use: identity, routing, gRPC framing and tracing.
ODD_HEADERS = st.tuples(
    st.sampled_from(
        [
            "x-genmesh-user-id",
            "x-genmesh-user-email",
            "x-genmesh-client-ip",
            "x-envoy-original-path",
            "x-forwarded-for",
            "x-admin-token",
            "grpc-timeout",
            "grpc-encoding",
            "grpc-accept-encoding",
            "grpc-message",
            "te",
            "content-encoding",
            "accept",
            "accept-encoding",
            "traceparent",
            "tracestate",
            "baggage",
            "x-request-id",
            "x-http-method-override",
            "cookie",
            "origin",
        ]
    ),
    st.one_of(
        HEADER_TEXT,
        st.sampled_from(
            [
                "admin",
                "1n",
                "0S",
                "99999999H",
                "gzip",
                "deflate, br",
                "identity",
                "trailers",
                "text/event-stream",
                "application/grpc",
                "00-00000000000000000000000000000000-0000000000000000-01",
                "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-ff",
                "203.0.113.9, 10.0.0.1",
                "/api/admin/cache",
                "GET",
            ]
        ),
    ),
)


# -- query strings -------------------------------------------------------------------------


def valid_utf8(text: str) -> str:
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


QUERY_CHARS = string.ascii_letters + string.digits + "-._~!$'()*+,;:@/?%[]{}|^`=&"


QUERY_TEXT = st.text(st.sampled_from(QUERY_CHARS), max_size=60)
QUERY_STRINGS = st.one_of(
    st.just(""),
    # Well-formed parameters with random names and values.
    st.lists(st.tuples(any_text, any_text), min_size=1, max_size=3).map(
        lambda pairs: urlencode([(valid_utf8(k), valid_utf8(v)) for k, v in pairs])
    ),
    # Raw, bad escapes included.
    QUERY_TEXT,
    st.tuples(
        st.sampled_from(["access_token", "alt", "$alt", "fields", "text", "user", "_"]),
        QUERY_TEXT,
    ).map("=".join),
)


# -- one request ---------------------------------------------------------------------------

ADMIN_CREDENTIALS = st.sampled_from(["good"] * 6 + ["none"] * 2 + ["wrong"])
AUTHORIZATIONS = st.sampled_from(["none"] * 7 + ["token"] * 2 + ["garbage"])
POST_CONTENT_TYPES = st.one_of(*weighted(st.just("application/json"), 8), CONTENT_TYPES)


def fuzz_request(route: Route) -> st.SearchStrategy[FuzzRequest]:
    bodies = post_body(route.message)
    odd_header, body_on_get = chance(10), chance(5)

    @st.composite
    def build(draw: st.DrawFn) -> FuzzRequest:
        headers: list[tuple[str, str | Token]] = []
        if route.admin:
            credential = draw(ADMIN_CREDENTIALS)
            if credential == "good":
                headers.append(("x-admin-token", ADMIN_TOKEN))
            elif credential == "wrong":
                headers.append(("x-admin-token", draw(HEADER_TEXT)))
        auth = draw(AUTHORIZATIONS)
        if auth == "token":
            headers.append(("authorization", draw(TOKENS)))
        elif auth == "garbage":
            headers.append(("authorization", draw(GARBAGE_AUTH)))
        if draw(odd_header):
            headers.append(draw(ODD_HEADERS))

        query, content, note = "", None, "no body"
        if route.method == "GET":
            query, note = draw(QUERY_STRINGS), "query"
            if draw(body_on_get):
                content, note = draw(bodies)
        else:
            content, note = draw(bodies)
        if content is not None:
            content_type = draw(POST_CONTENT_TYPES)
            if content_type:
                headers.append(("content-type", content_type))
        return FuzzRequest(route.method, query, tuple(headers), content, note)

    return build()


# -- when it is sent -----------------------------------------------------------------------

serial = itertools.count()


def client_address(n: int) -> str:
    """The n-th of 131072 addresses in 198.18.0.0/15 (set aside for benchmarks)."""
    return f"198.{18 + (n >> 16) % 2}.{(n >> 8) & 255}.{n & 255}"


def materialize(request: FuzzRequest) -> list[tuple[str, str]]:
    """The headers to send: tokens signed for a fresh user, and the X-Forwarded-For entry of
    the trusted proxy the test plays, with a fresh client address for every request (failed
    admin attempts get a client network blocked, and quotas count per network: neither may
    pile up across thousands of requests)."""
    out = []
    forwarded_for = []
    n = next(serial)
    for name, value in request.headers:
        text = f"Bearer {value.encode(f'fuzz-{RUN}-{n}')}" if isinstance(value, Token) else value
        if name == "x-forwarded-for":
            forwarded_for.append(text)
        else:
            out.append((name, text))
    forwarded_for.append(client_address(n))
    out.append(("x-forwarded-for", ", ".join(forwarded_for)))
    return out
