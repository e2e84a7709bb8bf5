"""The admin credential: a verified JWT whose role claim is `admin` (Envoy copies the claim
named by GATEWAY_ADMIN_ROLE_CLAIM into x-genmesh-user-role, Supabase's `app_metadata.role` by
default), or `x-admin-token` equal to GENMESH_ADMIN_TOKEN (compared in constant time; no token
configured turns that way off).

No credential at all is UNAUTHENTICATED (401); a signed-in user without the role, or a wrong
token, is PERMISSION_DENIED (403). Failed attempts are counted and reported at the edge (the
quota service's rate limit decision sees the same credential, see `credential_is_admin`), per
client and per burst, so a guesser cannot make the database write a row per guess; here every
successful admin action is a security event."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

import grpc

from services.common.errors import Reason, ServiceError
from services.common.identity import (
    ADMIN_TOKEN_HEADER,
    Identity,
    metadata_value,
)
from services.common.security_events import SEVERITY_LOW, SecurityEventSink

ADMIN_ROLE = "admin"


def token_matches(presented: str, configured: str) -> bool:
    """Constant time, and never true when no token is configured."""
    return bool(configured) and hmac.compare_digest(presented.encode(), configured.encode())


def credential_is_admin(presented_token: str, role: str, user_id: str, configured: str) -> bool:
    """Whether a request carries an admin credential: the admin role on a verified user, or
    the configured admin token."""
    return (bool(user_id) and role == ADMIN_ROLE) or token_matches(presented_token, configured)


class AdminGuard:
    def __init__(self, token: str, security_events: SecurityEventSink | None = None) -> None:
        self._token = token
        self.security_events = security_events

    def check(self, metadata: Sequence[Any] | None, identity: Identity, method: str) -> None:
        """Returns for an admin; raises UNAUTHENTICATED (no credential) or PERMISSION_DENIED
        (a credential that is not an admin's)."""
        presented = metadata_value(metadata, ADMIN_TOKEN_HEADER)
        if credential_is_admin(presented, identity.role, identity.user_id, self._token):
            self._report_action(identity, method, "token" if presented else "role")
            return
        if not presented and identity.is_guest:
            raise ServiceError(
                grpc.StatusCode.UNAUTHENTICATED,
                Reason.UNAUTHENTICATED,
                f"admin credential required: a token with the admin role, or the "
                f"{ADMIN_TOKEN_HEADER} header",
            )
        raise ServiceError(
            grpc.StatusCode.PERMISSION_DENIED,
            Reason.PERMISSION_DENIED,
            "this credential does not grant admin access",
        )

    def _report_action(self, identity: Identity, method: str, credential: str) -> None:
        if self.security_events is not None:
            self.security_events.report(
                "admin_action", SEVERITY_LOW, identity, {"method": method, "credential": credential}
            )
