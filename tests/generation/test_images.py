from __future__ import annotations

import pytest

from services.generation.images import check_image, sniff_image_type
from tests.images import tiny_png

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(16)
GIF87 = b"GIF87a" + bytes(16)
GIF89 = b"GIF89a" + bytes(16)
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(16)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (tiny_png(), "image/png"),
        (JPEG, "image/jpeg"),
        (GIF87, "image/gif"),
        (GIF89, "image/gif"),
        (WEBP, "image/webp"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(16), None),  # RIFF, but audio
        (b"\x00\x00\x00WEBP", None),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", None),
        (b"", None),
        (b"\x89PN", None),
    ],
)
def test_sniffs_the_real_type(data: bytes, expected: str | None) -> None:
    assert sniff_image_type(data) == expected


def test_matching_type_passes() -> None:
    assert check_image(tiny_png(), "image/png") is None
    assert check_image(WEBP, "image/webp") is None


def test_mismatch_names_image_mime_type() -> None:
    error = check_image(tiny_png(), "image/gif")
    assert error is not None
    assert error.reason == "INVALID_ARGUMENT"
    assert [v.field for v in error.violations] == ["image_mime_type"]
    assert "image/png" in error.violations[0].description

    unknown = check_image(b"hello", "image/png")
    assert unknown is not None
    assert unknown.violations[0].field == "image_mime_type"
    assert "not a PNG, JPEG, GIF or WebP" in unknown.violations[0].description
