"""Who is calling, read from the headers Envoy sets."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import ServiceError
from services.common.identity import (
    MAX_EMAIL_CHARS,
    MAX_USER_ID_CHARS,
    identity_from_metadata,
)


def test_the_headers_envoy_sets_make_the_identity() -> None:
    who = identity_from_metadata(
        (
            ("x-genmesh-user-id", "u-1"),
            ("x-genmesh-user-email", "ada@example.com"),
            ("x-genmesh-user-role", "admin"),
            ("x-genmesh-client-ip", "203.0.113.4"),
        ),
        "ipv4:10.0.0.1:5555",
    )
    assert (who.user_id, who.email, who.role, who.client_ip) == (
        "u-1",
        "ada@example.com",
        "admin",
        "203.0.113.4",
    )
    assert not who.is_guest


def test_without_envoys_headers_the_peer_is_the_client() -> None:
    assert identity_from_metadata((), "ipv6:[2001:db8::7]:5555").client_ip == "2001:db8::7"
    assert identity_from_metadata(None, "ipv4:10.0.0.1:5555").is_guest


@pytest.mark.parametrize(
    ("header", "value", "claim"),
    [
        ("x-genmesh-user-id", "u" * (MAX_USER_ID_CHARS + 1), "sub"),
        ("x-genmesh-user-email", "a" * MAX_EMAIL_CHARS + "@x", "email"),
    ],
)
def test_a_claim_longer_than_genmesh_keeps_is_invalid_argument(
    header: str, value: str, claim: str
) -> None:
    with pytest.raises(ServiceError) as caught:
        identity_from_metadata(((header, value), ("x-genmesh-user-id", "u")), "")
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in caught.value.violations] == [claim]


def test_claims_at_the_limits_are_kept() -> None:
    who = identity_from_metadata(
        (
            ("x-genmesh-user-id", "u" * MAX_USER_ID_CHARS),
            ("x-genmesh-user-email", "a" * (MAX_EMAIL_CHARS - 2) + "@x"),
        )
    )
    assert len(who.user_id) == MAX_USER_ID_CHARS
    assert len(who.email) == MAX_EMAIL_CHARS
