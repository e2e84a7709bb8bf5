"""The error model: every failure is a gRPC status with a google.rpc.ErrorInfo reason and,
where waiting helps, a google.rpc.RetryInfo; bad input carries google.rpc.BadRequest field
violations. Domain code raises `ServiceError`; the server interceptor turns it into the status.

Through Envoy's transcoder these become the HTTP status and a JSON body, and `retry-after`
(sent as trailing metadata on a Trailers-Only response) becomes the Retry-After header.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import grpc
from google.protobuf import duration_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "genmesh"

# What one error may carry. The details travel in the `grpc-status-details-bin` trailer (and the
# message also in `grpc-message`): a BadRequest listing thousands of violations overflows
# Envoy's header limits and the client gets a 502 instead of the 400. So an error lists at most
# the first MAX_FIELD_VIOLATIONS violations, each clipped, and its message says how many there
# were. Clipping counts UTF-8 bytes (ASCII text: characters), so even the worst case (every
# field, description and message at its limit, all multi-byte) stays under 16 KiB of trailers.
MAX_FIELD_VIOLATIONS = 20
MAX_VIOLATION_FIELD_BYTES = 200
MAX_VIOLATION_DESCRIPTION_BYTES = 200
MAX_STATUS_MESSAGE_BYTES = 1024


class Reason(StrEnum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    QUOTA_EXHAUSTED = "QUOTA_EXHAUSTED"
    RATE_LIMITED = "RATE_LIMITED"
    OVERLOADED = "OVERLOADED"
    UPSTREAM_UNAVAILABLE = "UPSTREAM_UNAVAILABLE"
    UPSTREAM_TIMEOUT = "UPSTREAM_TIMEOUT"
    UPSTREAM_REJECTED = "UPSTREAM_REJECTED"
    DEPENDENCY_UNAVAILABLE = "DEPENDENCY_UNAVAILABLE"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


def clip(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes (on a character boundary), with "..."
    marking the cut."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[: max(0, max_bytes - 3)].decode(errors="ignore") + "..."


def bounded_violations(violations: Sequence[FieldViolation]) -> tuple[FieldViolation, ...]:
    """The first MAX_FIELD_VIOLATIONS violations, each field and description clipped."""
    return tuple(
        FieldViolation(
            clip(v.field, MAX_VIOLATION_FIELD_BYTES),
            clip(v.description, MAX_VIOLATION_DESCRIPTION_BYTES),
        )
        for v in violations[:MAX_FIELD_VIOLATIONS]
    )


@dataclass
class ServiceError(Exception):
    """A failure the caller should see as it is (not an internal error)."""

    code: grpc.StatusCode
    reason: Reason
    message: str
    retry_after_seconds: float | None = None
    violations: Sequence[FieldViolation] = field(default_factory=tuple)
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason}: {self.message}"

    def to_grpc_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_status_proto())

    def to_status_proto(self) -> status_pb2.Status:
        """The google.rpc.Status (with ErrorInfo, BadRequest, RetryInfo details) this error is,
        bounded in size whatever the error holds (see MAX_FIELD_VIOLATIONS)."""
        status = status_pb2.Status(
            code=_CODE_NUMBERS[self.code], message=clip(self.message, MAX_STATUS_MESSAGE_BYTES)
        )
        info = error_details_pb2.ErrorInfo(
            reason=self.reason.value, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        status.details.add().Pack(info)
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in bounded_violations(self.violations)
                ]
            )
            status.details.add().Pack(bad)
        if self.retry_after_seconds is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(int(self.retry_after_seconds * 1000))
            status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return status

    def to_json(self) -> bytes:
        """The error as the JSON body Envoy's transcoder gives REST clients for a gRPC error,
        for replies Envoy sends itself (a rate-limit refusal)."""
        body = json_format.MessageToDict(self.to_status_proto(), preserving_proto_field_name=True)
        return json.dumps(body, separators=(",", ":")).encode()

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        base: tuple[tuple[str, str | bytes], ...] = tuple(self.to_grpc_status().trailing_metadata)
        if self.retry_after_seconds is None:
            return base
        return (*base, ("retry-after", str(retry_after_header(self.retry_after_seconds))))


def retry_after_header(seconds: float) -> int:
    """Retry-After is whole seconds; round up so a client never retries too early."""
    return max(1, math.ceil(seconds))


def invalid_argument(*violations: FieldViolation) -> ServiceError:
    """INVALID_ARGUMENT with a BadRequest of the first MAX_FIELD_VIOLATIONS violations; the
    message gives the total when there were more ("5000 invalid fields; the first 20 are
    listed: ...")."""
    listed = bounded_violations(violations)
    summary = "; ".join(f"{v.field}: {v.description}" for v in listed)
    if len(violations) > len(listed):
        summary = f"{len(violations)} invalid fields; the first {len(listed)} are listed: {summary}"
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_ARGUMENT,
        clip(f"invalid request: {summary}", MAX_STATUS_MESSAGE_BYTES),
        violations=listed,
    )


_CODE_NUMBERS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: code_pb2.OK,
    grpc.StatusCode.CANCELLED: code_pb2.CANCELLED,
    grpc.StatusCode.UNKNOWN: code_pb2.UNKNOWN,
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED: code_pb2.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE: code_pb2.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED: code_pb2.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS: code_pb2.DATA_LOSS,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
}


def error_info_from_call(details: Sequence[tuple[str, str | bytes]]) -> ServiceError | None:
    """Rebuild a ServiceError from a failed call's trailing metadata (for callers that relay
    another service's error, like generation relaying quota's QUOTA_EXHAUSTED)."""
    raw = next((v for k, v in details if k == "grpc-status-details-bin"), None)
    if not isinstance(raw, bytes):
        return None
    status = status_pb2.Status.FromString(raw)
    reason: Reason | None = None
    retry: float | None = None
    violations: list[FieldViolation] = []
    metadata: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = Reason(info.reason) if info.reason in Reason.__members__ else Reason.INTERNAL
            metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            retry = retry_info.retry_delay.ToMilliseconds() / 1000
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
    if reason is None:
        return None
    code = next((c for c, n in _CODE_NUMBERS.items() if n == status.code), grpc.StatusCode.UNKNOWN)
    return ServiceError(code, reason, status.message, retry, violations, metadata)
