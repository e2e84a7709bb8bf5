from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from genmesh.telemetry.v1 import telemetry_pb2
from services.common.errors import (
    MAX_FIELD_VIOLATIONS,
    MAX_STATUS_MESSAGE_BYTES,
    MAX_VIOLATION_DESCRIPTION_BYTES,
    MAX_VIOLATION_FIELD_BYTES,
    FieldViolation,
    Reason,
    ServiceError,
    clip,
    error_info_from_call,
    invalid_argument,
    retry_after_header,
)
from services.common.interceptors import ServiceInterceptor, validate_request


def test_a_service_error_round_trips_through_trailing_metadata() -> None:
    err = ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.QUOTA_EXHAUSTED,
        "used up",
        retry_after_seconds=12.2,
        metadata={"plan": "free"},
    )
    metadata = err.trailing_metadata()
    assert ("retry-after", "13") in metadata
    back = error_info_from_call(metadata)
    assert back is not None
    assert back.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert back.reason is Reason.QUOTA_EXHAUSTED
    assert back.retry_after_seconds == pytest.approx(12.2)
    assert back.metadata == {"plan": "free"}


def test_invalid_argument_carries_every_field() -> None:
    err = invalid_argument(FieldViolation("a", "bad"), FieldViolation("b.c", "worse"))
    back = error_info_from_call(err.trailing_metadata())
    assert back is not None
    assert [v.field for v in back.violations] == ["a", "b.c"]
    assert "a: bad" in err.message


@pytest.mark.parametrize(("seconds", "header"), [(0.1, 1), (1.0, 1), (1.01, 2), (3599.5, 3600)])
def test_retry_after_rounds_up(seconds: float, header: int) -> None:
    assert retry_after_header(seconds) == header


def test_validation_names_nested_fields() -> None:
    request = telemetry_pb2.TrackEventsRequest(
        events=[telemetry_pb2.FunnelEvent(event_id="nope", event="page_view")]
    )
    with pytest.raises(ServiceError) as caught:
        validate_request(request)
    assert [v.field for v in caught.value.violations] == ["events[0].event_id"]


def test_a_valid_request_passes() -> None:
    validate_request(telemetry_pb2.SubmitFeedbackRequest(rating=3))


# -- bounded errors: a request with thousands of violations is still a small 400 ------------


def _status_of(err: ServiceError) -> status_pb2.Status:
    raw = dict(err.trailing_metadata())["grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    return status_pb2.Status.FromString(raw)


def _bad_request(status: status_pb2.Status) -> error_details_pb2.BadRequest:
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad
    raise AssertionError("no BadRequest")


def _wire_size(err: ServiceError) -> int:
    """Bytes the error's trailers take on the wire: the base64 details and the
    percent-encoded grpc-message (every byte outside printable ASCII takes three)."""
    status = err.to_grpc_status()
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert isinstance(details, bytes)
    message = status.details.encode()
    encoded_message = sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in message)
    return len(base64.b64encode(details)) + encoded_message


def test_a_few_violations_are_all_listed_without_a_count() -> None:
    violations = [FieldViolation(f"f{i}", "bad") for i in range(MAX_FIELD_VIOLATIONS)]
    err = invalid_argument(*violations)
    assert len(_bad_request(_status_of(err)).field_violations) == MAX_FIELD_VIOLATIONS
    assert "invalid fields" not in err.message
    assert err.message.startswith("invalid request: f0: bad; f1: bad")


def test_thousands_of_violations_list_the_first_twenty_and_count_them() -> None:
    violations = [FieldViolation(f"events[{i}].event_id", "must be a UUID") for i in range(5000)]
    err = invalid_argument(*violations)
    assert MAX_FIELD_VIOLATIONS == 20
    assert len(err.violations) == 20
    assert err.message.startswith(
        "invalid request: 5000 invalid fields; the first 20 are listed: "
        "events[0].event_id: must be a UUID"
    )
    status = _status_of(err)
    assert status.message == err.message
    listed = [v.field for v in _bad_request(status).field_violations]
    assert listed == [f"events[{i}].event_id" for i in range(20)]
    back = error_info_from_call(err.trailing_metadata())
    assert back is not None
    assert back.code is grpc.StatusCode.INVALID_ARGUMENT
    assert len(back.violations) == 20
    assert _wire_size(err) < 4096


def test_long_fields_descriptions_and_messages_are_clipped() -> None:
    err = invalid_argument(FieldViolation("f" * 5000, "d" * 5000))
    (violation,) = _bad_request(_status_of(err)).field_violations
    assert len(violation.field) == MAX_VIOLATION_FIELD_BYTES
    assert violation.field.endswith("...")
    assert len(violation.description) == MAX_VIOLATION_DESCRIPTION_BYTES
    assert len(err.message.encode()) <= MAX_STATUS_MESSAGE_BYTES
    assert err.message.endswith("...")


def test_clip_counts_utf8_bytes_and_cuts_on_a_character_boundary() -> None:
    assert clip("short", 10) == "short"
    clipped = clip("é" * 300, 200)  # 2 bytes each
    assert len(clipped.encode()) <= 200
    assert clipped == "é" * 98 + "..."
    assert clip("😀" * 100, 10) == "😀..."  # 4 bytes each: 7 bytes leave room for one
    assert clip("x" * 10, 10) == "x" * 10


def test_any_service_error_is_bounded_when_sent() -> None:
    """A ServiceError built directly (or relayed from another service) is bounded too."""
    err = ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_ARGUMENT,
        "m" * 100_000,
        violations=[FieldViolation(f"f{i}", "x" * 1000) for i in range(10_000)],
    )
    status = _status_of(err)
    assert len(status.message.encode()) <= MAX_STATUS_MESSAGE_BYTES
    violations = _bad_request(status).field_violations
    assert len(violations) == MAX_FIELD_VIOLATIONS
    assert all(len(v.description) <= MAX_VIOLATION_DESCRIPTION_BYTES for v in violations)
    assert json.loads(err.to_json())["message"] == status.message


def test_the_worst_case_error_stays_far_below_envoys_header_limits() -> None:
    """Every field, description and message at its limit in 4-byte characters: the
    trailers stay under 16 KiB (Envoy's default limit for all headers is 60 KiB)."""
    big = "😀" * 10_000
    err = invalid_argument(*(FieldViolation(big, big) for _ in range(10_000)))
    assert _wire_size(err) < 16 * 1024
    direct = ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_ARGUMENT,
        big,
        violations=[FieldViolation(big, big)] * 10_000,
    )
    assert _wire_size(direct) < 16 * 1024


def test_validation_of_5000_malformed_events_is_bounded() -> None:
    request = telemetry_pb2.TrackEventsRequest(
        events=[telemetry_pb2.FunnelEvent(event_id="x", event="e") for _ in range(5000)]
    )
    with pytest.raises(ServiceError) as caught:
        validate_request(request)
    err = caught.value
    # events: max_items, and each event's id
    assert "5001 invalid fields; the first 20 are listed" in err.message
    assert [v.field for v in err.violations] == [
        "events",
        *(f"events[{i}].event_id" for i in range(19)),
    ]


async def test_5000_violations_through_the_interceptor_are_a_bounded_invalid_argument() -> None:
    """A real grpc.aio server with the ServiceInterceptor: the handler never runs, the client
    gets INVALID_ARGUMENT with 20 violations and the total in the message."""
    calls = []

    async def track(
        request: telemetry_pb2.TrackEventsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> telemetry_pb2.TrackEventsResponse:
        calls.append(request)
        return telemetry_pb2.TrackEventsResponse()

    server = grpc.aio.server(
        interceptors=[ServiceInterceptor()], options=[("grpc.so_reuseport", 0)]
    )
    method = grpc.unary_unary_rpc_method_handler(
        track,
        request_deserializer=telemetry_pb2.TrackEventsRequest.FromString,
        response_serializer=telemetry_pb2.TrackEventsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "genmesh.telemetry.v1.TelemetryService", {"TrackEvents": method}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                "/genmesh.telemetry.v1.TelemetryService/TrackEvents",
                request_serializer=telemetry_pb2.TrackEventsRequest.SerializeToString,
                response_deserializer=telemetry_pb2.TrackEventsResponse.FromString,
            )
            request = telemetry_pb2.TrackEventsRequest(
                events=[telemetry_pb2.FunnelEvent(event_id=f"bad-{i}") for i in range(5000)]
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(request, timeout=10)
    finally:
        await server.stop(None)
    failure = caught.value
    assert calls == []
    assert failure.code() is grpc.StatusCode.INVALID_ARGUMENT
    # events: max_items; each event: a malformed event_id and an empty event name
    assert "10001 invalid fields; the first 20 are listed" in (failure.details() or "")
    trailing: Any = tuple(failure.trailing_metadata() or ())
    relayed = error_info_from_call(trailing)
    assert relayed is not None
    assert relayed.reason is Reason.INVALID_ARGUMENT
    assert len(relayed.violations) == MAX_FIELD_VIOLATIONS
    assert relayed.violations[1] == FieldViolation("events[0].event_id", "must be a valid UUID")
    details = dict(trailing)["grpc-status-details-bin"]
    assert isinstance(details, bytes)
    assert len(details) < 4096
