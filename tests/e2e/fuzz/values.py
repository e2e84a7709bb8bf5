"""Hypothesis strategies for the values in a request body: random JSON (with strings that mean
something to some parser on the way), and objects shaped like a request message, each field
with a value drawn from its protovalidate rules, from its type, or of any type at all, so
requests get past the JSON parser into validation and the handlers."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

from buf.validate import validate_pb2
from tests.images import tiny_png

# -- random JSON ---------------------------------------------------------------------------

# Strings that mean something to some parser on the way.
SPECIAL_STRINGS = (
    "",
    " ",
    "null",
    "true",
    "0",
    "-0",
    "1e309",
    "NaN",
    "Infinity",
    "-Infinity",
    "0x1F",
    "\x00",
    "\x7f",
    "\ufeff",
    "\u202e",
    "\ud800",
    "\udfff",
    "\U0010ffff",
    "%s%n%x",
    "%00",
    "' OR '1'='1",
    "<script>alert(1)</script>",
    "../../etc/passwd",
    "${jndi:ldap://x/a}",
    "{{7*7}}",
    "\r\nx-injected: 1",
    "@type",
    "__proto__",
    "image/png",
    "en",
    "pt-BR",
    "admin",
    "127.0.0.1",
    "::1",
    "user",
    "ip",
)

any_text = st.one_of(
    st.text(max_size=16),
    st.sampled_from(SPECIAL_STRINGS),
    st.text(st.characters(codec="ascii"), max_size=16),
    # Lone surrogates: not encodable as UTF-8; sent as \\u escapes or as raw invalid bytes.
    st.lists(st.characters(categories=["Cs"]) | st.characters(), min_size=1, max_size=4).map(
        "".join
    ),
)
huge_ints = st.sampled_from(
    [2**31 - 1, 2**31, -(2**31) - 1, 2**53 + 1, 2**63, 2**64, -(2**64), 10**400]
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge_ints,
    st.floats(),  # NaN and infinities too: json.dumps writes them as invalid JSON
    any_text,
)
any_json: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(any_text, children, max_size=4),
    ),
    max_leaves=8,
)

# -- JSON shaped like a request message, from its descriptor and protovalidate rules ----------

INT_FIELD_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}
FLOAT_FIELD_TYPES = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}


def weighted(strategy: st.SearchStrategy[Any], weight: int) -> list[st.SearchStrategy[Any]]:
    """`weight` copies, for st.one_of (which picks a branch uniformly)."""
    return [strategy] * weight


@cache
def chance(percent: int) -> st.SearchStrategy[bool]:
    """True `percent` times in a hundred; shrinks to False."""
    return st.integers(0, 99).map(lambda n: n >= 100 - percent)


def field_rules(f: FieldDescriptor) -> Any:
    options = f.GetOptions()
    if options.HasExtension(validate_pb2.field):
        return options.Extensions[validate_pb2.field]
    return validate_pb2.FieldRules()


def repeat(n: int) -> Callable[[str], str]:
    return lambda c: c * n


@cache
def string_values(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    rules = field_rules(f)
    options: list[st.SearchStrategy[Any]] = [any_text]
    if rules.HasField("string"):
        r = rules.string
        if r.pattern:
            options += weighted(st.from_regex(r.pattern, fullmatch=True), 3)
        allowed = list(getattr(r, "in"))
        if allowed:
            options += weighted(st.sampled_from(allowed), 3)
            options.append(st.sampled_from(allowed).map(str.upper))
        if r.email:
            options += weighted(st.emails(), 3)
            options.append(st.emails().map(lambda e: e.replace("@", "@@")))
            options.append(st.emails().map(lambda e: f" {e.upper()} "))
        if r.uuid:
            options += weighted(st.uuids().map(str), 3)
            options.append(st.uuids().map(lambda u: u.hex.upper()))
            options.append(st.uuids().map(lambda u: f"{{{u}}}"))
        for length in {r.max_len, r.max_len + 1, r.min_len, max(0, r.min_len - 1)}:
            if length and r.HasField("max_len"):
                # One character, multi-byte UTF-8 and astral (two UTF-16 units) at the bounds.
                options.append(st.sampled_from("xé😀").map(repeat(length)))
    if f.name == "generation_id":
        options.append(st.uuids().map(str))
    return st.one_of(options)


IMAGE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBP",
)


def png_claiming(size: tuple[int, int]) -> bytes:
    """A PNG whose header says `size` (zero, or billions of pixels: a decompression bomb),
    with a valid header checksum and one row of pixel data."""
    width, height = size
    if 0 < width <= 8 and 0 < height <= 8:
        return tiny_png(width, height)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )


image_bytes = st.one_of(
    st.binary(max_size=64),
    st.tuples(st.sampled_from(IMAGE_MAGIC), st.binary(max_size=64)).map(b"".join),
    st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)).map(png_claiming),
    st.tuples(st.integers(1, 8), st.integers(1, 8)).map(lambda wh: tiny_png(*wh)),
)
bytes_values = st.one_of(
    image_bytes.map(lambda b: base64.b64encode(b).decode()),
    image_bytes.map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    image_bytes.map(lambda b: base64.b64encode(b).decode() + "!*"),
    any_text,
)


@cache
def int_values(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    rules = field_rules(f)
    bounds: set[int] = {0, 1, -1, 2**31 - 1, -(2**31), 2**32, 2**63 - 1, 2**64}
    kind = rules.WhichOneof("type")
    if kind is not None:
        r = getattr(rules, kind)
        for name in ("gte", "lte", "gt", "lt", "const"):
            if r.HasField(name):
                value = int(getattr(r, name))
                bounds |= {value - 1, value, value + 1}
    numbers = st.one_of(st.sampled_from(sorted(bounds)), st.integers(-10, 10), st.integers())
    return st.one_of(
        *weighted(numbers, 4),
        numbers.map(str),
        numbers.map(float),
        numbers.map(lambda n: n + 0.5),
        st.sampled_from(["1e2", "0x10", " 1", "1 ", "+1", "NaN"]),
    )


@cache
def enum_values(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    enum = f.enum_type
    assert enum is not None
    names = [v.name for v in enum.values]
    numbers = [v.number for v in enum.values]
    return st.one_of(
        st.sampled_from(names),
        st.sampled_from(numbers),
        st.sampled_from([max(numbers) + 1, -1, 2**31]),
        st.sampled_from(names).map(str.lower),
    )


timestamp_values = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat().replace("+00:00", "Z")),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")),
    st.sampled_from(
        [
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            "0000-01-01T00:00:00Z",
            "10000-01-01T00:00:00Z",
            "1970-01-01T00:00:00+14:00",
            "2024-02-30T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:60Z",
            "2024-01-01T00:00:00.0000000001Z",
            "2024-01-01",
            "now",
            datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        ]
    ),
    st.integers(),
)


def struct_values() -> st.SearchStrategy[Any]:
    """google.protobuf.Struct: any JSON object, and ones around the 4 KiB properties limit."""
    big = st.integers(4000, 4200).map(lambda n: {"k": "x" * n})
    return st.one_of(
        *weighted(st.dictionaries(any_text, any_json, max_size=5), 3),
        big,
        st.dictionaries(st.text(max_size=3), st.just("y" * 500), min_size=8, max_size=12),
        any_json,
    )


WELL_KNOWN: dict[str, st.SearchStrategy[Any]] = {
    "google.protobuf.Timestamp": timestamp_values,
    "google.protobuf.Struct": struct_values(),
    "google.protobuf.Value": any_json,
    "google.protobuf.ListValue": st.lists(any_json, max_size=5),
    "google.protobuf.Duration": st.sampled_from(["1s", "1.5s", "-1s", "1", "315576000001s"]),
}
MAX_DEPTH = 3


SCALARS: dict[int, Callable[[FieldDescriptor], st.SearchStrategy[Any]]] = {
    FieldDescriptor.TYPE_STRING: string_values,
    FieldDescriptor.TYPE_BYTES: lambda f: bytes_values,
    FieldDescriptor.TYPE_ENUM: enum_values,
    FieldDescriptor.TYPE_BOOL: lambda f: st.one_of(
        *weighted(st.booleans(), 3), st.sampled_from(["true", "false", 1, 0, "yes"])
    ),
    **dict.fromkeys(INT_FIELD_TYPES, int_values),
    **dict.fromkeys(
        FLOAT_FIELD_TYPES,
        lambda f: st.one_of(
            st.floats(), st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "1.5"])
        ),
    ),
}


@cache
def single_value(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """A value for one element of `f`, as the field's type would have it."""
    if f.type in SCALARS:
        return SCALARS[f.type](f)
    message = f.message_type
    assert message is not None
    if message.full_name in WELL_KNOWN:
        return WELL_KNOWN[message.full_name]
    if depth >= MAX_DEPTH:
        return any_json
    return shaped_object(message, depth + 1)


@cache
def field_value(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """A value for `f`: mostly of its type, sometimes of any type at all."""
    one = single_value(f, depth)
    if f.is_repeated:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value_field = f.message_type.fields_by_name["value"]
            typed = st.dictionaries(any_text, single_value(value_field, depth), max_size=4)
        else:
            r = field_rules(f).repeated
            sizes = {0, 1, r.min_items, r.max_items, r.max_items + 1}
            typed = st.one_of(
                *weighted(st.lists(one, max_size=4), 4),
                # At the size bounds: one element repeated (drawing 100 would be slow).
                st.tuples(one, st.sampled_from(sorted(sizes))).map(lambda vn: [vn[0]] * vn[1]),
                one,  # a single value where a list belongs
            )
    else:
        typed = one
    return st.one_of(*weighted(typed, 6), any_json)


@cache
def shaped_object(message: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """An object with `message`'s field names (either spelling), some of them present, each
    with a random value, and sometimes an unknown field or two."""
    members = [
        (f, f.json_name if f.json_name != f.name else None, field_value(f, depth))
        for f in message.fields
    ]
    present, other_spelling, unknown = chance(65), chance(20), chance(10)
    unknown_fields = st.dictionaries(any_text, any_json, min_size=1, max_size=2)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for f, json_name, values in members:
            if draw(present):
                name = json_name if json_name and draw(other_spelling) else f.name
                obj[name] = draw(values)
        if draw(unknown):
            obj.update(draw(unknown_fields))
        return obj

    return build()
