"""Image checks beyond protovalidate: the bytes must be the image type the client declared,
recognised by their magic numbers (a declared type alone proves nothing), and the image must
not declare more pixels than GEN_MAX_IMAGE_PIXELS (a decompression bomb: a small file whose
header promises an enormous canvas, which whoever decodes it, the model API or a later
thumbnailer, would have to allocate).

The size comes from the header alone: Pillow's `Image.open` is lazy, it parses the header and
stops before the pixel data (nothing here calls `load()`), and it is restricted to the one
format the magic bytes showed, so no other of Pillow's many parsers ever sees the bytes.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from services.common.errors import FieldViolation, ServiceError, invalid_argument

# Media type -> how its files start. WebP is a RIFF container with "WEBP" at offset 8.
_SIGNATURES: tuple[tuple[str, bytes, int], ...] = (
    ("image/png", b"\x89PNG\r\n\x1a\n", 0),
    ("image/jpeg", b"\xff\xd8\xff", 0),
    ("image/gif", b"GIF87a", 0),
    ("image/gif", b"GIF89a", 0),
    ("image/webp", b"WEBP", 8),
)

# Media type -> the name of Pillow's plugin for it.
_PILLOW_FORMATS = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/gif": "GIF",
    "image/webp": "WEBP",
}


def sniff_image_type(data: bytes) -> str | None:
    """The media type the bytes really are (PNG, JPEG, GIF or WebP), or None."""
    for media_type, magic, offset in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic and (
            media_type != "image/webp" or data[:4] == b"RIFF"
        ):
            return media_type
    return None


def image_dimensions(data: bytes, media_type: str) -> tuple[int, int] | None:
    """(width, height) from the header of an image already sniffed as `media_type`, without
    decoding it; None if the header cannot be parsed.

    Raises Image.DecompressionBombError for a header Pillow itself refuses to open (over twice
    its MAX_IMAGE_PIXELS, about 179 million pixels), which is over any limit we allow.
    """
    with warnings.catch_warnings():
        # Pillow warns above its own MAX_IMAGE_PIXELS (about 89 million pixels); the decision
        # is check_image's, against GEN_MAX_IMAGE_PIXELS, so the warning is noise here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=[_PILLOW_FORMATS[media_type]]) as image:
                width, height = image.size
        except Image.DecompressionBombError:
            raise
        except UnidentifiedImageError:
            return None
        except Exception:
            # Whatever else a header parser raises on hostile bytes (OSError, ValueError,
            # EOFError...) means the same: the header is not readable.
            return None
    if width <= 0 or height <= 0:
        return None
    return width, height


def check_image(data: bytes, declared_type: str, *, max_pixels: int) -> ServiceError | None:
    """The INVALID_ARGUMENT error for image bytes that are not what `declared_type` says
    (naming `image_mime_type`), or whose header cannot be read or declares more than
    `max_pixels` pixels, width times height (naming `image_data`)."""
    actual = sniff_image_type(data)
    if actual != declared_type:
        if actual is None:
            description = "the image is not a PNG, JPEG, GIF or WebP file"
        else:
            description = f"declared {declared_type} but the bytes are {actual}"
        return invalid_argument(FieldViolation("image_mime_type", description))
    try:
        size = image_dimensions(data, actual)
    except Image.DecompressionBombError:
        return _too_many_pixels(None, max_pixels)
    if size is None:
        return invalid_argument(FieldViolation("image_data", f"the {actual} header cannot be read"))
    width, height = size
    if width * height > max_pixels:
        return _too_many_pixels(size, max_pixels)
    return None


def _too_many_pixels(size: tuple[int, int] | None, max_pixels: int) -> ServiceError:
    what = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
    return invalid_argument(
        FieldViolation(
            "image_data", f"the image declares {what}; at most {max_pixels} pixels are allowed"
        )
    )
