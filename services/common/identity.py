"""Who is calling, as Envoy established it. Envoy verifies the JWT and sets these headers
itself (stripping client-sent copies); services trust them only because nothing but Envoy can
reach them (a NetworkPolicy says so in Kubernetes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.common.errors import FieldViolation, invalid_argument

USER_ID_HEADER = "x-genmesh-user-id"
USER_EMAIL_HEADER = "x-genmesh-user-email"
CLIENT_IP_HEADER = "x-genmesh-client-ip"
# The token's role claim (GATEWAY_ADMIN_ROLE_CLAIM, Supabase's app_metadata.role by default).
USER_ROLE_HEADER = "x-genmesh-user-role"
ADMIN_TOKEN_HEADER = "x-admin-token"  # noqa: S105 - a header name, not a secret
# The longest user id and email genmesh keeps (quota.v1.Caller, the profiles table).
MAX_USER_ID_CHARS = 128
MAX_EMAIL_CHARS = 320


@dataclass(frozen=True)
class Identity:
    user_id: str
    email: str
    client_ip: str
    role: str = ""

    @property
    def is_guest(self) -> bool:
        return not self.user_id


def metadata_value(metadata: Sequence[Any] | None, key: str) -> str:
    for item in metadata or ():
        k, v = item
        if k == key and isinstance(v, str):
            return v
    return ""


def identity_from_metadata(metadata: Sequence[Any] | None, peer: str = "") -> Identity:
    """Read the caller from invocation metadata. A direct gRPC caller without Envoy's headers
    is identified by its peer address, so internal callers are still counted somewhere.

    Raises INVALID_ARGUMENT for a token claim longer than genmesh stores (the same bounds as
    quota.v1.Caller and the profiles table): the issuer signed it, but it cannot be kept."""
    client_ip = metadata_value(metadata, CLIENT_IP_HEADER) or _peer_ip(peer)
    identity = Identity(
        user_id=metadata_value(metadata, USER_ID_HEADER),
        email=metadata_value(metadata, USER_EMAIL_HEADER),
        client_ip=client_ip,
        role=metadata_value(metadata, USER_ROLE_HEADER),
    )
    too_long = [
        FieldViolation(claim, f"the token's {claim} claim is longer than {limit} characters")
        for claim, value, limit in (
            ("sub", identity.user_id, MAX_USER_ID_CHARS),
            ("email", identity.email, MAX_EMAIL_CHARS),
        )
        if len(value) > limit
    ]
    if too_long:
        raise invalid_argument(*too_long)
    return identity


def _peer_ip(peer: str) -> str:
    # grpc peers look like "ipv4:127.0.0.1:5555" or "ipv6:[::1]:5555".
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return ""
