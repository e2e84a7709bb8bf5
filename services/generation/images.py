"""Image checks beyond protovalidate: the bytes must be the image type the client declared,
recognised by their magic numbers (a declared type alone proves nothing)."""

from __future__ import annotations

from services.common.errors import FieldViolation, ServiceError, invalid_argument

# Media type -> how its files start. WebP is a RIFF container with "WEBP" at offset 8.
_SIGNATURES: tuple[tuple[str, bytes, int], ...] = (
    ("image/png", b"\x89PNG\r\n\x1a\n", 0),
    ("image/jpeg", b"\xff\xd8\xff", 0),
    ("image/gif", b"GIF87a", 0),
    ("image/gif", b"GIF89a", 0),
    ("image/webp", b"WEBP", 8),
)


def sniff_image_type(data: bytes) -> str | None:
    """The media type the bytes really are (PNG, JPEG, GIF or WebP), or None."""
    for media_type, magic, offset in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic and (
            media_type != "image/webp" or data[:4] == b"RIFF"
        ):
            return media_type
    return None


def check_image(data: bytes, declared_type: str) -> ServiceError | None:
    """The INVALID_ARGUMENT error for image bytes that are not what `declared_type` says."""
    actual = sniff_image_type(data)
    if actual == declared_type:
        return None
    if actual is None:
        description = "the image is not a PNG, JPEG, GIF or WebP file"
    else:
        description = f"declared {declared_type} but the bytes are {actual}"
    return invalid_argument(FieldViolation("image_mime_type", description))
