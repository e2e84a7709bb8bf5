"""Hypothesis strategies for request bodies that keep their message's protovalidate rules, so
every route also gets requests its handler accepts (random shapes almost never do for a
message like a batch of events, where every event needs a UUID and a named event)."""

from __future__ import annotations

import re
import string
from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

from buf.validate import validate_pb2
from tests.e2e.fuzz.values import FLOAT_FIELD_TYPES, INT_FIELD_TYPES, field_rules

PRINTABLE = st.text(
    st.sampled_from(string.ascii_letters + string.digits + " -_.é"), min_size=1, max_size=40
)


def _named_by_message_rules(f: FieldDescriptor) -> bool:
    """Whether a message-level rule asks for the field to be set (`this.text.size() > 0`);
    the fields such a rule offers as alternatives (image_data) are left out here."""
    assert f.containing_type is not None
    options = f.containing_type.GetOptions()
    if not options.HasExtension(validate_pb2.message):
        return False
    rules = options.Extensions[validate_pb2.message]
    return any(f"this.{f.name}.size() > 0" in rule.expression for rule in rules.cel)


def _empty_fails(f: FieldDescriptor) -> bool:
    """Whether leaving the field out (its empty value) breaks its rules."""
    rules = field_rules(f)
    if _named_by_message_rules(f):
        return True
    if rules.HasField("string"):
        r = rules.string
        empty_misses_pattern = bool(r.pattern) and re.fullmatch(r.pattern, "") is None
        return bool(
            r.uuid or r.email or r.min_len or list(getattr(r, "in")) or empty_misses_pattern
        )
    if rules.HasField("repeated"):
        return bool(rules.repeated.min_items > 0)
    kind = rules.WhichOneof("type")
    if kind is not None and kind.startswith(("int", "uint", "sint", "fixed", "sfixed")):
        r = getattr(rules, kind)
        return bool((r.HasField("gte") and r.gte > 0) or (r.HasField("gt") and r.gt >= 0))
    return False


@cache
def _string(f: FieldDescriptor) -> st.SearchStrategy[str]:
    r = field_rules(f).string
    if r.uuid:
        return st.uuids().map(str)
    if r.email:
        return st.from_regex(r"\A[a-z]{1,12}@example\.com\Z")
    allowed = list(getattr(r, "in"))
    if allowed:
        return st.sampled_from(allowed)
    if r.pattern:
        return st.from_regex(r.pattern, fullmatch=True).filter(
            lambda s: not r.max_len or len(s) <= r.max_len
        )
    if r.HasField("max_len"):
        return PRINTABLE.map(lambda s: s[: r.max_len])
    return PRINTABLE


@cache
def _int(f: FieldDescriptor) -> st.SearchStrategy[int]:
    rules = field_rules(f)
    kind = rules.WhichOneof("type")
    low, high = 0, 1000
    if kind is not None:
        r = getattr(rules, kind)
        low = int(r.gte) if r.HasField("gte") else int(r.gt) + 1 if r.HasField("gt") else low
        high = int(r.lte) if r.HasField("lte") else int(r.lt) - 1 if r.HasField("lt") else high
    return st.integers(low, high)


SCALARS: dict[int, st.SearchStrategy[Any]] = {
    **dict.fromkeys(FLOAT_FIELD_TYPES, st.floats(0, 1000)),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
}
WELL_KNOWN: dict[str, st.SearchStrategy[Any]] = {
    "google.protobuf.Struct": st.dictionaries(st.sampled_from("abc"), PRINTABLE, max_size=3),
    "google.protobuf.Timestamp": st.just("2026-01-02T03:04:05Z"),
}


def _single(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if f.type == FieldDescriptor.TYPE_STRING:
        return _string(f)
    if f.type in INT_FIELD_TYPES:
        return _int(f)
    if f.type in SCALARS:
        return SCALARS[f.type]
    if f.type == FieldDescriptor.TYPE_ENUM:
        assert f.enum_type is not None
        return st.sampled_from([v.name for v in f.enum_type.values if v.number != 0])
    assert f.message_type is not None  # bytes (images) are left out by the caller
    name = f.message_type.full_name
    return WELL_KNOWN[name] if name in WELL_KNOWN else conforming_object(f.message_type, depth + 1)


@cache
def conforming_object(message: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """An object that keeps `message`'s field rules: fields whose empty value would break a
    rule are always there, one member of each oneof, the others sometimes; nested messages
    alike."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        # One member of each oneof (bytes members aside).
        chosen = {
            oneof.name: draw(st.sampled_from(members))
            for oneof in message.oneofs
            if (members := [f.name for f in oneof.fields if f.type != FieldDescriptor.TYPE_BYTES])
        }
        for f in message.fields:
            if f.containing_oneof is not None and chosen.get(f.containing_oneof.name) != f.name:
                continue
            in_oneof = f.containing_oneof is not None
            if f.type == FieldDescriptor.TYPE_BYTES or (depth > 2 and not _empty_fails(f)):
                continue
            if not in_oneof and not _empty_fails(f) and not draw(st.booleans()):
                continue
            one = _single(f, depth)
            if f.is_repeated:
                rules = field_rules(f).repeated
                low = max(1, rules.min_items)
                high = min(rules.max_items, 3) if rules.max_items else 3
                obj[f.name] = draw(st.lists(one, min_size=low, max_size=max(low, high)))
            else:
                obj[f.name] = draw(one)
        return obj

    return build()
