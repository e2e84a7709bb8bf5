"""Requests turned into table rows, with the checks protovalidate cannot express: sizes of
free-form JSON, time windows, and what PostgreSQL itself would refuse (NUL characters, lengths
the schema caps). Everything a batch writes is checked here first, so one request's bad row
can never make a whole group-commit batch fail."""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, NamedTuple

from google.protobuf import json_format, message, struct_pb2, timestamp_pb2
from google.protobuf.internal.containers import MessageMap

from genmesh.telemetry.v1 import telemetry_pb2
from services.common.client_networks import DEFAULT_NETWORKS, ClientNetworks
from services.common.errors import FieldViolation, ServiceError, invalid_argument
from services.common.identity import Identity

# The largest `properties` object of a funnel event, serialized as compact JSON (UTF-8).
MAX_PROPERTIES_BYTES = 4 * 1024
# Security events come from our own services; still, a bound keeps one from bloating the table.
MAX_DETAILS_BYTES = 16 * 1024
# The schema's cap on `lang` (the protovalidate pattern allows longer tags).
MAX_LANG_CHARS = 35
# How far an event's client clock may be ahead of ours, and how old an event may be.
MAX_FUTURE_SKEW = timedelta(hours=24)
MAX_EVENT_AGE = timedelta(days=30)

# The client's idempotency key (draft-ietf-httpapi-idempotency-key-header): the HTTP header
# `Idempotency-Key`, which Envoy's transcoder passes on as gRPC metadata.
IDEMPOTENCY_KEY_HEADER = "idempotency-key"
IDEMPOTENCY_KEY_FIELD = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_CHARS = 255
# The routes keys are scoped to (with the caller): one key may serve each route once.
FEEDBACK_ROUTE = "SubmitFeedback"
WISHLIST_ROUTE = "JoinWishlist"
# The draft defines the header as a Structured Field String ("..."); a bare value is accepted
# too, as most clients send one. Inside the quotes, only \" and \\ are escapes.
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\\"])*)"')
_SF_ESCAPE = re.compile(r"\\([\\\"])")

SEVERITIES: dict[int, str] = {
    telemetry_pb2.SEVERITY_LOW: "low",
    telemetry_pb2.SEVERITY_MEDIUM: "medium",
    telemetry_pb2.SEVERITY_HIGH: "high",
    telemetry_pb2.SEVERITY_CRITICAL: "critical",
}


@dataclass(frozen=True)
class IdempotencyKey:
    """A client's idempotency key, scoped: one (route, scope, key) stands for one request,
    whose `fingerprint` (SHA-256 of the request's canonical JSON) a retry must match."""

    route: str
    # "user:<user id>", or "guest:<client network>" (the IPv4 address, the IPv6 /64).
    scope: str
    key: str
    fingerprint: bytes

    @property
    def ident(self) -> tuple[str, str, str]:
        return (self.route, self.scope, self.key)


@dataclass(frozen=True)
class FeedbackRow:
    id: uuid.UUID
    user_id: str | None
    client_ip: str | None
    generation_id: str | None
    rating: int
    comment: str
    lang: str
    # Not a column: the request's key, kept in idempotency_keys with this row's id.
    idempotency: IdempotencyKey | None = None

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "id",
        "user_id",
        "client_ip",
        "generation_id",
        "rating",
        "comment",
        "lang",
    )

    def record(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.user_id,
            self.client_ip,
            self.generation_id,
            self.rating,
            self.comment,
            self.lang,
        )


class FunnelEventRow(NamedTuple):
    """One event as its table row, fields in FUNNEL_EVENT_COLUMNS order. A tuple rather than a
    frozen dataclass: one is built per event, and a frozen dataclass costs four times as much."""

    # The client's UUID in canonical (lowercase) form: the same event, however it was cased.
    event_id: str
    user_id: str | None
    session_id: str
    event: str
    source: str
    lang: str
    properties_json: str
    client_ip: str | None
    occurred_at: datetime


FUNNEL_EVENT_COLUMNS: tuple[str, ...] = (
    "event_id",
    "user_id",
    "session_id",
    "event",
    "source",
    "lang",
    "properties",
    "client_ip",
    "occurred_at",
)


@dataclass(frozen=True)
class SecurityEventRow:
    id: uuid.UUID
    event_type: str
    severity: str
    user_id: str | None
    ip: str | None
    details_json: str

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "id",
        "event_type",
        "severity",
        "user_id",
        "ip",
        "details",
    )

    def record(self) -> tuple[Any, ...]:
        return (self.id, self.event_type, self.severity, self.user_id, self.ip, self.details_json)


def idempotency_key(
    metadata: Sequence[Any] | None,
    route: str,
    who: Identity,
    request: message.Message,
    networks: ClientNetworks = DEFAULT_NETWORKS,
) -> IdempotencyKey | None:
    """The request's `Idempotency-Key`, scoped to the caller and `route`, or None without one.
    A guest's scope is its client network (`networks`), as guests are counted everywhere.

    Raises INVALID_ARGUMENT naming `Idempotency-Key` unless it is sent once and is 1 to 255
    printable ASCII characters (bare, or as a quoted Structured Field String)."""
    values = [v for k, v in metadata or () if k == IDEMPOTENCY_KEY_HEADER]
    if not values:
        return None
    if len(values) > 1:
        raise _bad_key("must be sent once")
    value = values[0]
    if not isinstance(value, str):
        raise _bad_key(f"must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters")
    key = value
    if value.startswith('"'):
        quoted = _SF_STRING.fullmatch(value)
        if quoted is None:
            raise _bad_key(
                'must be a bare value or a quoted string ("...", escaping only " and \\)'
            )
        key = _SF_ESCAPE.sub(r"\1", quoted.group(1))
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not all(" " <= c <= "~" for c in key):
        raise _bad_key(f"must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters")
    if who.user_id:
        scope = f"user:{who.user_id}"
    else:
        scope = f"guest:{networks.network_of(who.client_ip) or who.client_ip}"
    return IdempotencyKey(route=route, scope=scope, key=key, fingerprint=fingerprint(request))


def fingerprint(request: message.Message) -> bytes:
    """SHA-256 of the request as canonical JSON (fields by proto name, sorted, defaults left
    out): the same payload, however it was spelled, has the same fingerprint."""
    as_dict = json_format.MessageToDict(request, preserving_proto_field_name=True)
    canonical = json.dumps(as_dict, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).digest()


def _bad_key(description: str) -> ServiceError:
    return invalid_argument(FieldViolation(IDEMPOTENCY_KEY_FIELD, description))


def feedback_row(
    request: telemetry_pb2.SubmitFeedbackRequest,
    who: Identity,
    idempotency: IdempotencyKey | None = None,
) -> FeedbackRow:
    violations = [
        *_text_violations("comment", request.comment),
        *_text_violations("generation_id", request.generation_id),
        *_lang_violations("lang", request.lang),
    ]
    if violations:
        raise invalid_argument(*violations)
    return FeedbackRow(
        id=uuid.uuid4(),
        user_id=who.user_id or None,
        client_ip=who.client_ip or None,
        generation_id=request.generation_id or None,
        rating=request.rating,
        comment=request.comment,
        lang=request.lang,
        idempotency=idempotency,
    )


def wishlist_lang(request: telemetry_pb2.JoinWishlistRequest) -> str:
    violations = _lang_violations("lang", request.lang)
    if violations:
        raise invalid_argument(*violations)
    return request.lang


def funnel_event_rows(
    events: Sequence[telemetry_pb2.FunnelEvent], who: Identity, now: datetime
) -> list[FunnelEventRow]:
    """All events of a request, or INVALID_ARGUMENT naming every bad field."""
    rows: list[FunnelEventRow] = []
    violations: list[FieldViolation] = []
    user_id, client_ip = who.user_id or None, who.client_ip or None
    for i, event in enumerate(events):
        # Every read of a string field builds a new str: read each once.
        session_id, source, lang = event.session_id, event.source, event.lang
        properties, properties_problem = struct_json(event.properties, MAX_PROPERTIES_BYTES)
        occurred_at, time_problem = now, ""
        if event.HasField("occurred_at"):
            occurred_at, time_problem = _event_time(event.occurred_at, now)
        if (
            properties_problem
            or time_problem
            or "\x00" in session_id
            or "\x00" in source
            or len(lang) > MAX_LANG_CHARS
        ):
            path = f"events[{i}]"
            violations.extend(
                [
                    *_text_violations(f"{path}.session_id", session_id),
                    *_text_violations(f"{path}.source", source),
                    *_lang_violations(f"{path}.lang", lang),
                ]
            )
            if properties_problem:
                violations.append(FieldViolation(f"{path}.properties", properties_problem))
            if time_problem:
                violations.append(FieldViolation(f"{path}.occurred_at", time_problem))
            continue
        # protovalidate has checked the id is a UUID in its hyphenated form, so only the case
        # can tell two spellings of one id apart.
        event_id = event.event_id.lower()
        rows.append(
            FunnelEventRow(
                event_id,
                user_id,
                session_id,
                event.event,
                source,
                lang,
                properties,
                client_ip,
                occurred_at,
            )
        )
    if violations:
        raise invalid_argument(*violations)
    return rows


def security_event_row(request: telemetry_pb2.RecordSecurityEventRequest) -> SecurityEventRow:
    violations = [
        *_text_violations("user_id", request.user_id),
        *_text_violations("ip", request.ip),
    ]
    details, problem = struct_json(request.details, MAX_DETAILS_BYTES)
    if problem:
        violations.append(FieldViolation("details", problem))
    severity = SEVERITIES.get(request.severity)
    if severity is None:  # protovalidate already refuses these; kept so the map stays total
        violations.append(FieldViolation("severity", "must be a defined, non-zero severity"))
    if violations or severity is None:
        raise invalid_argument(*violations)
    return SecurityEventRow(
        id=uuid.uuid4(),
        event_type=request.event_type,
        severity=severity,
        user_id=request.user_id or None,
        ip=request.ip or None,
        details_json=details,
    )


# One encoder for every event: json.dumps with options builds a new one per call.
_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def struct_json(value: struct_pb2.Struct, max_bytes: int) -> tuple[str, str]:
    """Compact JSON for a Struct and, if it cannot be stored, why (else "")."""
    fields = value.fields
    if not fields:  # most events carry no properties: skip the conversions
        return "{}", ""
    try:
        text = _struct_json_text(fields)
    except ValueError:
        return "{}", "must not contain NaN or infinite numbers"
    # ASCII text, the usual, has as many bytes as characters: no need to encode it.
    size = len(text) if text.isascii() else len(text.encode())
    if size > max_bytes:
        return "{}", f"must be at most {max_bytes} bytes as JSON, got {size}"
    if _has_nul_escape(text):
        return "{}", "must not contain NUL characters"
    return text, ""


def _struct_json_text(fields: MessageMap[str, struct_pb2.Value]) -> str:
    """The Struct as _COMPACT_JSON writes MessageToDict's dict of it, several times faster:
    events are the hot path. Scalars, nearly all values, are written here as json writes them
    (keys and strings with its own escaping function, numbers by float repr), nested values by
    _COMPACT_JSON. The map is read by key: its items() goes through the Mapping ABC's Python
    code, twice as slow."""
    parts = []
    for key in fields:
        value = fields[key]
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            text = _json_string(value.string_value)
        elif kind == "number_value":
            text = _json_number(value.number_value)
        elif kind == "bool_value":
            text = "true" if value.bool_value else "false"
        elif kind is None or kind == "null_value":
            text = "null"
        else:
            text = _COMPACT_JSON.encode(_value_plain(value))
        parts.append(f"{_json_string(key)}:{text}")
    return "{" + ",".join(parts) + "}"


_json_string = json.encoder.encode_basestring  # what json uses without ensure_ascii


def _json_number(number: float) -> str:
    if not math.isfinite(number):  # as json with allow_nan=False
        raise ValueError(f"Out of range float values are not JSON compliant: {number!r}")
    return repr(number)


def _struct_plain(value: struct_pb2.Struct) -> dict[str, object]:
    """The Struct as plain Python values, as json_format.MessageToDict gives them (numbers stay
    floats)."""
    fields = value.fields
    return {key: _value_plain(fields[key]) for key in fields}


def _value_plain(value: struct_pb2.Value) -> object:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _struct_plain(value.struct_value)
    if kind == "list_value":
        return [_value_plain(item) for item in value.list_value.values]
    if kind is None or kind == "null_value":
        return None
    return getattr(value, kind)


def _has_nul_escape(text: str) -> bool:
    """Whether JSON text encodes a NUL character (always as the escape \\u0000) in a key or a
    value. An escaped backslash followed by "u0000" is text, not NUL: drop the escaped
    backslashes first (escapes read left to right, as str.replace scans)."""
    return "\\u0000" in text and "\\u0000" in text.replace("\\\\", "")


def _event_time(ts: timestamp_pb2.Timestamp, now: datetime) -> tuple[datetime, str]:
    if not 0 <= ts.nanos < 1_000_000_000:
        return now, "must be a valid timestamp"
    # Compare in seconds first: far-off values would overflow datetime.
    seconds = ts.seconds + ts.nanos / 1e9
    if not math.isfinite(seconds) or seconds > (now + MAX_FUTURE_SKEW).timestamp():
        return now, "must not be more than 24 hours in the future"
    if seconds < (now - MAX_EVENT_AGE).timestamp():
        return now, "must not be more than 30 days in the past"
    return datetime.fromtimestamp(ts.seconds, UTC) + timedelta(microseconds=ts.nanos // 1000), ""


def _text_violations(field: str, value: str) -> list[FieldViolation]:
    # PostgreSQL text cannot hold NUL; catching it here keeps the batch it would join safe.
    if "\x00" in value:
        return [FieldViolation(field, "must not contain NUL characters")]
    return []


def _lang_violations(field: str, value: str) -> list[FieldViolation]:
    if len(value) > MAX_LANG_CHARS:
        return [FieldViolation(field, f"must be at most {MAX_LANG_CHARS} characters")]
    return []
