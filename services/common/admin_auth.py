"""The admin credential: `x-admin-token` must equal GENMESH_ADMIN_TOKEN (compared in constant
time). No token configured means the admin API is off. Every refusal is a security event."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

import grpc

from genmesh.telemetry.v1.telemetry_pb2 import Severity
from services.common.errors import Reason, ServiceError
from services.common.identity import ADMIN_TOKEN_HEADER, Identity, metadata_value
from services.common.security_events import (
    SEVERITY_HIGH,
    SEVERITY_MEDIUM,
    SecurityEventSink,
)


class AdminGuard:
    def __init__(self, token: str, security_events: SecurityEventSink | None = None) -> None:
        self._token = token.encode()
        self.security_events = security_events

    @property
    def enabled(self) -> bool:
        return bool(self._token)

    def check(self, metadata: Sequence[Any] | None, identity: Identity, method: str) -> None:
        """Raises UNAUTHENTICATED (no credential) or PERMISSION_DENIED (wrong credential, or
        the admin API is disabled)."""
        if not self.enabled:
            self._refuse(identity, method, "disabled", SEVERITY_MEDIUM)
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED, "admin API disabled"
            )
        presented = metadata_value(metadata, ADMIN_TOKEN_HEADER)
        if not presented:
            self._refuse(identity, method, "missing", SEVERITY_MEDIUM)
            raise ServiceError(
                grpc.StatusCode.UNAUTHENTICATED,
                Reason.UNAUTHENTICATED,
                f"admin credential required ({ADMIN_TOKEN_HEADER} header)",
            )
        if not hmac.compare_digest(presented.encode(), self._token):
            self._refuse(identity, method, "invalid", SEVERITY_HIGH)
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                Reason.PERMISSION_DENIED,
                "invalid admin credential",
            )

    def _refuse(
        self, identity: Identity, method: str, why: str, severity: Severity.ValueType
    ) -> None:
        if self.security_events is not None:
            self.security_events.report(
                "admin_auth_failed", severity, identity, {"reason": why, "method": method}
            )
