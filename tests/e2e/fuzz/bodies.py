"""Hypothesis strategies for whole request bodies: a shaped object, random JSON, an object
that keeps its message's rules, or malformed bytes (truncated, nested past any parser's
limit, wrapped in junk, with duplicate keys, huge, invalid UTF-8)."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor
from hypothesis import strategies as st

from tests.e2e.fuzz.conforming import conforming_object
from tests.e2e.fuzz.values import any_json, shaped_object


@st.composite
def truncated(draw: st.DrawFn, message: Descriptor) -> bytes:
    whole = json.dumps(draw(shaped_object(message))).encode()
    return whole[: draw(st.integers(0, max(0, len(whole) - 1)))]


@st.composite
def deeply_nested(draw: st.DrawFn) -> bytes:
    """Deeper than any parser's limit, or just at it."""
    depth = draw(st.sampled_from([31, 32, 33, 63, 64, 65, 99, 100, 101, 1000, 20000]))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    return (opener * depth + "1" + closer * depth).encode()


@st.composite
def wrapped(draw: st.DrawFn, message: Descriptor) -> bytes:
    """A byte-order mark, trailing data or comments around a good object."""
    good = json.dumps(draw(shaped_object(message)))
    forms = [f"\ufeff{good}", f"{good} {good}", f"{good} //", f"/* */{good}", f"{good},"]
    return draw(st.sampled_from(forms)).encode()


@st.composite
def duplicate_keys(draw: st.DrawFn, message: Descriptor) -> bytes:
    obj = draw(shaped_object(message))
    pairs = [f"{json.dumps(k)}:{json.dumps(v)}" for k, v in obj.items()] * 2
    return ("{" + ",".join(pairs) + "}").encode()


@cache
def malformed_body(message: Descriptor) -> st.SearchStrategy[bytes]:
    return st.one_of(
        truncated(message),
        deeply_nested(),
        wrapped(message),
        duplicate_keys(message),
        st.integers(0, 200_000).map(lambda n: json.dumps({"text": "y" * n}).encode()),
        # Invalid UTF-8 inside a string.
        st.binary(min_size=1, max_size=8).map(lambda b: b'{"text": "' + b + b'\xff\xfe"}'),
        st.binary(max_size=64),
    )


def serialize(value: Any, ascii_only: bool) -> bytes:
    # Lone surrogates: \\u escapes with ascii_only, raw (invalid) UTF-8 otherwise.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


BODY_KINDS = st.sampled_from(["shaped"] * 6 + ["random"] * 3 + ["malformed"] * 1 + ["conforming"])


@cache
def post_body(message: Descriptor) -> st.SearchStrategy[tuple[bytes, str]]:
    @st.composite
    def build(draw: st.DrawFn) -> tuple[bytes, str]:
        kind = draw(BODY_KINDS)
        if kind == "malformed":
            return draw(malformed_body(message)), kind
        if kind == "conforming":
            return serialize(draw(conforming_object(message)), True), kind
        value = draw(shaped_object(message)) if kind == "shaped" else draw(any_json)
        return serialize(value, draw(st.booleans())), kind

    return build()
