"""Bearer tokens: JWTs signed by hand when the request is sent, most of them good ones for a
fresh user, the rest with odd claims, another key or an odd expiry."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, fields
from typing import Any

from hypothesis import strategies as st

from tests.e2e.conftest import JWT_ISSUER, JWT_SECRET
from tests.e2e.fuzz.values import any_text, weighted


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


JWT_HEADER = b64url(b'{"alg":"HS256","typ":"JWT"}')


@dataclass(frozen=True)
class Token:
    """A JWT signed with the mesh's secret, made when the request is sent. `sub=None` is a
    fresh user (each has a small daily quota, so fresh ones keep quota out of the way)."""

    sub: Any = None
    claims: tuple[tuple[str, Any], ...] = ()
    key: str = JWT_SECRET
    expires_in: int = 600

    def encode(self, fresh_user: str) -> str:
        """Signed by hand: a JWT library would refuse to sign some of these claims."""
        payload: dict[str, Any] = {
            "sub": fresh_user if self.sub is None else self.sub,
            "role": "authenticated",
            "aud": "authenticated",
            "iss": JWT_ISSUER,
            "exp": int(time.time()) + self.expires_in,
        }
        payload.update(self.claims)
        signing_input = f"{JWT_HEADER}.{b64url(json.dumps(payload).encode())}"
        mac = hmac.new(self.key.encode(), signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64url(mac)}"

    def __repr__(self) -> str:
        """Only what differs from a good token for a fresh user."""
        odd = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != f.default
        ]
        return f"Token({', '.join(odd)})"


# A token signed by the trusted issuer whose sub or email holds a control character gets 503
# from Envoy 1.40 (jwt_authn copies the claim into a header, and an invalid header value fails
# the request: filter_removed_required_request_headers). Only the trusted issuer can mint such
# a token; documented as a known limitation in services/gateway/README.md.
CONTROL_CHARACTERS = dict.fromkeys([*range(0x20), 0x7F])


def without_control_characters(value: Any) -> Any:
    """`value` with its control characters dropped, if it is a string."""
    return value.translate(CONTROL_CHARACTERS) if isinstance(value, str) else value


def odd_claims_token(sub: Any, claims: tuple[tuple[str, Any], ...]) -> Token:
    """A token with these claims, but no control character in `sub` or `email` (see above).
    They are dropped here, not by a `.map` on the strategies: a map adds spans that
    Hypothesis's mutator sees, and would change many other requests it draws."""
    return Token(
        sub=without_control_characters(sub),
        claims=tuple(
            (name, without_control_characters(value) if name == "email" else value)
            for name, value in claims
        ),
    )


CLAIM_VALUES = st.one_of(
    any_text,
    st.integers(),
    st.booleans(),
    st.none(),
    st.lists(st.text(max_size=5), max_size=2),
    # Longer than the services keep (user ids 128 characters, emails 320).
    st.sampled_from(["u" * 129, "e" * 320 + "@example.com"]),
)
TOKENS = st.one_of(
    *weighted(st.just(Token()), 4),
    st.builds(
        odd_claims_token,
        sub=st.one_of(any_text, st.integers(), st.just("x" * 300), st.sampled_from(["admin"])),
        claims=st.lists(
            st.tuples(
                st.sampled_from(["email", "role", "aud", "iss", "nbf", "is_pro", "plan"]),
                CLAIM_VALUES,
            ),
            max_size=3,
        ).map(tuple),
    ),
    st.builds(Token, key=st.just("not-the-secret-" * 3)),
    st.builds(Token, expires_in=st.sampled_from([-3600, -1, 10**10])),
)
