from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
from PIL import Image

from services.generation.images import check_image, image_dimensions, sniff_image_type
from services.generation.settings import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_IMAGE_PIXELS_CEILING,
    GenerationSettings,
)
from tests.images import BOMBS, gif_bomb, jpeg_bomb, png_bomb, real_image, tiny_png, webp_bomb

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(16)
GIF87 = b"GIF87a" + bytes(16)
GIF89 = b"GIF89a" + bytes(16)
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(16)

TYPES = sorted(BOMBS)
LIMIT = DEFAULT_MAX_IMAGE_PIXELS


def fields(error: object) -> list[str]:
    assert error is not None
    violations = getattr(error, "violations", ())
    return [v.field for v in violations]


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


# -- accepted ------------------------------------------------------------------------------


@pytest.mark.parametrize("media_type", TYPES)
def test_a_valid_image_of_each_type_passes(media_type: str) -> None:
    data = real_image(media_type, 3, 2)
    assert image_dimensions(data, media_type) == (3, 2)
    assert check_image(data, media_type, max_pixels=LIMIT) is None


def test_tiny_png_passes() -> None:
    assert check_image(tiny_png(), "image/png", max_pixels=LIMIT) is None


@pytest.mark.parametrize("media_type", TYPES)
def test_an_image_exactly_at_the_limit_passes(media_type: str) -> None:
    assert check_image(real_image(media_type, 30, 20), media_type, max_pixels=600) is None


# -- refused: type ---------------------------------------------------------------------------


def test_mismatch_names_image_mime_type() -> None:
    error = check_image(tiny_png(), "image/gif", max_pixels=LIMIT)
    assert error is not None
    assert error.reason == "INVALID_ARGUMENT"
    assert fields(error) == ["image_mime_type"]
    assert "image/png" in error.violations[0].description


@pytest.mark.parametrize("media_type", TYPES)
def test_a_non_image_names_image_mime_type(media_type: str) -> None:
    error = check_image(b"hello, not an image", media_type, max_pixels=LIMIT)
    assert fields(error) == ["image_mime_type"]
    assert error is not None
    assert "not a PNG, JPEG, GIF or WebP" in error.violations[0].description


@pytest.mark.parametrize("media_type", TYPES)
def test_each_type_declared_as_another_is_refused(media_type: str) -> None:
    other = next(t for t in TYPES if t != media_type)
    error = check_image(real_image(media_type), other, max_pixels=LIMIT)
    assert fields(error) == ["image_mime_type"]


# -- refused: unreadable header -------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "media_type"),
    [
        (b"\x89PNG\r\n\x1a\n", "image/png"),  # the signature and nothing else
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "image/png"),
        (png_bomb(0, 0), "image/png"),  # no pixels
        (JPEG, "image/jpeg"),  # no frame header
        (jpeg_bomb(0, 10), "image/jpeg"),
        (GIF89, "image/gif"),
        (b"GIF89a", "image/gif"),
        (WEBP, "image/webp"),  # a VP8 chunk of zeros
        (real_image("image/webp")[:20], "image/webp"),
    ],
)
def test_a_header_that_cannot_be_parsed_is_invalid(data: bytes, media_type: str) -> None:
    assert sniff_image_type(data) == media_type  # the magic bytes alone are right
    error = check_image(data, media_type, max_pixels=LIMIT)
    assert error is not None
    assert error.reason == "INVALID_ARGUMENT"
    assert fields(error) == ["image_data"]
    assert "cannot be read" in error.violations[0].description


# -- refused: too many pixels ----------------------------------------------------------------


@pytest.mark.parametrize("media_type", TYPES)
def test_a_real_image_with_too_many_pixels_is_refused(media_type: str) -> None:
    error = check_image(real_image(media_type, 30, 21), media_type, max_pixels=600)
    assert error is not None
    assert error.reason == "INVALID_ARGUMENT"
    assert fields(error) == ["image_data"]
    assert "30x21" in error.violations[0].description
    assert "600" in error.violations[0].description


def test_a_real_png_just_over_the_default_limit_is_refused() -> None:
    data = real_image("image/png", 5001, 5000, mode="1")
    assert len(data) < 100_000  # small file, 25,005,000 pixels
    assert fields(check_image(data, "image/png", max_pixels=LIMIT)) == ["image_data"]
    assert check_image(data, "image/png", max_pixels=5001 * 5000) is None


@pytest.mark.parametrize(
    ("media_type", "width", "height"),
    [
        ("image/png", 100_000, 100_000),  # far past Pillow's own ceiling
        ("image/png", 6000, 5000),  # past ours only
        ("image/jpeg", 65_535, 65_535),
        ("image/jpeg", 6000, 5000),
        ("image/gif", 65_535, 65_535),
        ("image/gif", 6000, 5000),
        ("image/webp", 16_384, 16_384),
        ("image/webp", 16_384, 10_000),  # under Pillow's ceiling, so libwebp gets it
        ("image/webp", 6000, 5000),
    ],
)
def test_a_decompression_bomb_is_refused(media_type: str, width: int, height: int) -> None:
    data = BOMBS[media_type](width, height)
    assert len(data) < 200  # a tiny file declaring an enormous canvas
    assert sniff_image_type(data) == media_type
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither Pillow's warning nor its error escapes
        error = check_image(data, media_type, max_pixels=LIMIT)
    assert error is not None
    assert error.reason == "INVALID_ARGUMENT"
    assert fields(error) == ["image_data"]
    assert f"at most {LIMIT} pixels" in error.violations[0].description
    if width * height <= MAX_IMAGE_PIXELS_CEILING:
        assert f"{width}x{height}" in error.violations[0].description


@pytest.mark.parametrize(
    ("media_type", "bomb"),
    [
        ("image/png", png_bomb),
        ("image/jpeg", jpeg_bomb),
        ("image/gif", gif_bomb),
        ("image/webp", webp_bomb),
    ],
)
def test_the_bomb_builders_declare_what_they_say(
    media_type: str, bomb: Callable[[int, int], bytes]
) -> None:
    """The crafted headers are read as intended (not refused for some other reason)."""
    assert image_dimensions(bomb(40, 30), media_type) == (40, 30)
    assert check_image(bomb(40, 30), media_type, max_pixels=LIMIT) is None


def test_a_gif_frame_larger_than_its_screen_counts() -> None:
    """A GIF's logical screen can be tiny while a frame is huge: a decoder grows the canvas."""
    data = gif_bomb(6000, 5000)
    data = data[:6] + (10).to_bytes(2, "little") + (10).to_bytes(2, "little") + data[10:]
    assert fields(check_image(data, "image/gif", max_pixels=LIMIT)) == ["image_data"]


def test_pillows_global_limit_is_left_alone() -> None:
    before = Image.MAX_IMAGE_PIXELS
    check_image(png_bomb(100_000, 100_000), "image/png", max_pixels=LIMIT)
    assert before == Image.MAX_IMAGE_PIXELS


# -- the setting -----------------------------------------------------------------------------


def test_the_setting_defaults_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GenerationSettings().gen_max_image_pixels == 25_000_000
    monkeypatch.setenv("GEN_MAX_IMAGE_PIXELS", "1000")
    assert GenerationSettings().gen_max_image_pixels == 1000
    for bad in ("0", str(MAX_IMAGE_PIXELS_CEILING + 1)):
        monkeypatch.setenv("GEN_MAX_IMAGE_PIXELS", bad)
        with pytest.raises(ValueError, match="GEN_MAX_IMAGE_PIXELS"):
            GenerationSettings()
