from __future__ import annotations

import grpc
import pytest

from genmesh.telemetry.v1 import telemetry_pb2
from services.common.errors import (
    FieldViolation,
    Reason,
    ServiceError,
    error_info_from_call,
    invalid_argument,
    retry_after_header,
)
from services.common.interceptors import validate_request


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
