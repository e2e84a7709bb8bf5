"""Requests to rows: the checks protovalidate cannot express."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from genmesh.telemetry.v1 import telemetry_pb2
from services.common.errors import ServiceError
from services.common.identity import Identity
from services.telemetry import records

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
GUEST = Identity(user_id="", email="", client_ip="203.0.113.9")


def event(**fields: Any) -> telemetry_pb2.FunnelEvent:
    return telemetry_pb2.FunnelEvent(event_id=str(uuid.uuid4()), event="page_view", **fields)


def at(moment: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts


def violations(err: pytest.ExceptionInfo[ServiceError]) -> dict[str, str]:
    return {v.field: v.description for v in err.value.violations}


def test_an_event_row_carries_identity_properties_and_time() -> None:
    props = struct_pb2.Struct()
    props.update({"button": "primary", "n": 2})
    who = Identity(user_id="u1", email="", client_ip="198.51.100.7")
    [row] = records.funnel_event_rows(
        [event(properties=props, occurred_at=at(NOW - timedelta(hours=1)))], who, NOW
    )
    assert row.user_id == "u1"
    assert row.client_ip == "198.51.100.7"
    assert json.loads(row.properties_json) == {"button": "primary", "n": 2}
    assert row.occurred_at == NOW - timedelta(hours=1)


def test_a_missing_time_means_now_and_a_guest_has_no_user_id() -> None:
    [row] = records.funnel_event_rows([event()], GUEST, NOW)
    assert row.occurred_at == NOW
    assert row.user_id is None
    assert row.properties_json == "{}"


@pytest.mark.parametrize(
    ("moment", "words"),
    [
        (NOW + timedelta(hours=25), "future"),
        (NOW - timedelta(days=31), "past"),
        (datetime(9999, 1, 1, tzinfo=UTC), "future"),
    ],
)
def test_times_out_of_the_window_are_refused(moment: datetime, words: str) -> None:
    with pytest.raises(ServiceError) as caught:
        records.funnel_event_rows([event(), event(occurred_at=at(moment))], GUEST, NOW)
    assert words in violations(caught)["events[1].occurred_at"]


def test_oversized_or_unstorable_properties_are_refused() -> None:
    big = struct_pb2.Struct()
    big.update({"blob": "x" * 5000})
    nan = struct_pb2.Struct()
    nan.update({"v": math.nan})
    nul = struct_pb2.Struct()
    nul.update({"k": "a\x00b"})
    with pytest.raises(ServiceError) as caught:
        records.funnel_event_rows(
            [event(properties=big), event(properties=nan), event(properties=nul)], GUEST, NOW
        )
    found = violations(caught)
    assert "4096 bytes" in found["events[0].properties"]
    assert "NaN" in found["events[1].properties"]
    assert "NUL" in found["events[2].properties"]


@pytest.mark.parametrize(
    "properties",
    [
        {"k\x00": 1},  # in a key
        {"k": ["ok", {"deep": "\\\x00"}]},  # nested, after a backslash
    ],
)
def test_nul_anywhere_in_properties_is_refused(properties: dict[str, Any]) -> None:
    value = struct_pb2.Struct()
    value.update(properties)
    with pytest.raises(ServiceError) as caught:
        records.funnel_event_rows([event(properties=value)], GUEST, NOW)
    assert "NUL" in violations(caught)["events[0].properties"]


def test_properties_are_stored_as_compact_json_with_text_that_only_looks_like_nul() -> None:
    value = struct_pb2.Struct()
    value.update({"path": "C:\\u0000", "n": 3, "list": [True, None, "é"]})
    (row,) = records.funnel_event_rows([event(properties=value)], GUEST, NOW)
    assert json.loads(row.properties_json) == {
        "path": "C:\\u0000",
        "n": 3.0,
        "list": [True, None, "é"],
    }
    assert " " not in row.properties_json and "é" in row.properties_json


def test_text_postgres_cannot_store_is_refused_before_it_reaches_a_batch() -> None:
    request = telemetry_pb2.SubmitFeedbackRequest(rating=4, comment="a\x00b", lang="en-" + "a" * 40)
    with pytest.raises(ServiceError) as caught:
        records.feedback_row(request, GUEST)
    assert set(violations(caught)) == {"comment", "lang"}


def test_severity_is_stored_as_its_word() -> None:
    request = telemetry_pb2.RecordSecurityEventRequest(
        event_type="rate_limit_block", severity=telemetry_pb2.SEVERITY_CRITICAL, ip="192.0.2.1"
    )
    row = records.security_event_row(request)
    assert (row.severity, row.ip, row.user_id, row.details_json) == (
        "critical",
        "192.0.2.1",
        None,
        "{}",
    )


def test_an_event_id_is_kept_in_its_canonical_lowercase_form() -> None:
    event_id = "6BA7B810-9DAD-11D1-80B4-00C04FD430C8"
    (row,) = records.funnel_event_rows(
        [telemetry_pb2.FunnelEvent(event_id=event_id, event="page_view")], GUEST, NOW
    )
    assert row.event_id == str(uuid.UUID(event_id))


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    built = struct_pb2.Struct()
    built.update(value)
    # As a request brings it: parsed from the wire.
    return struct_pb2.Struct.FromString(built.SerializeToString())


STRUCTS: list[dict[str, Any]] = [
    {"i": 7},
    {"": "", "zero": 0, "neg_zero": -0.0, "tiny": 1e-7, "big": 1e300, "int53": 2**53 + 1},
    {"pi": 3.141592653589793, "n": -1.5, "big_int": 1e16, "t": True, "f": False, "none": None},
    {"é": "ünïcode ✓ 🚀 漢字", "esc": 'quote " backslash \\ slash /', "ctl": "\n\t\r\x01\x1f\x7f"},
    {"sep": "\u2028\u2029", "nul": "a\x00b", "k\x00": 1, "looks_nul": "C:\\u0000"},
    {"list": [1, "two", None, True, [], {}, [3.5, {"deep": {"deeper": [False]}}]]},
    {"nested": {"a": {"b": {"c": "d"}}, "empty": {}}, "flat": "x", "n": 2},
]


@pytest.mark.parametrize("value", STRUCTS)
def test_struct_json_is_the_compact_json_of_message_to_dict(value: dict[str, Any]) -> None:
    message = struct(value)
    expected = json.dumps(
        json_format.MessageToDict(message), ensure_ascii=False, separators=(",", ":")
    )
    assert records._struct_json_text(message.fields) == expected
    assert records._COMPACT_JSON.encode(records._struct_plain(message)) == expected


def test_a_value_without_a_kind_is_null() -> None:
    message = struct_pb2.Struct()
    message.fields["unset"].SetInParent()
    assert records.struct_json(message, 100) == ('{"unset":null}', "")


@pytest.mark.parametrize(
    "value",
    [
        {"v": math.inf},
        {"v": -math.inf},
        {"list": [1, math.nan]},
        {"deep": {"v": math.inf}},
    ],
)
def test_non_finite_numbers_are_refused_wherever_they_are(value: dict[str, Any]) -> None:
    assert records.struct_json(struct(value), 4096) == (
        "{}",
        "must not contain NaN or infinite numbers",
    )


def test_the_size_limit_counts_utf8_bytes() -> None:
    ascii_text = records.struct_json(struct({"k": "x" * 4088}), 4096)
    assert ascii_text == ('{"k":"' + "x" * 4088 + '"}', "")
    # 2,045 two-byte characters: 4,098 bytes, though only 2,053 characters.
    wide = records.struct_json(struct({"k": "é" * 2045}), 4096)
    assert wide == ("{}", "must be at most 4096 bytes as JSON, got 4098")
