"""Tiny real images built in code, so tests ship no binary files."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def tiny_png(width: int = 2, height: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# -- real images of each type (Pillow), and headers that lie about their size ----------------


PILLOW_FORMATS = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/gif": "GIF",
    "image/webp": "WEBP",
}


def real_image(media_type: str, width: int = 3, height: int = 2, mode: str = "RGB") -> bytes:
    """A complete, decodable image of `media_type`, encoded by Pillow (single-colour, so even
    a large one compresses to a small file)."""
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, PILLOW_FORMATS[media_type])
    return out.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose IHDR declares width x height (with one tiny IDAT)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def jpeg_bomb(width: int, height: int) -> bytes:
    """A ~50-byte baseline JPEG whose SOF0 declares width x height (at most 65535 each)."""

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    sof = struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"
    return (
        b"\xff\xd8"
        + segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        + segment(0xC0, sof)
        + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
        + bytes(8)
        + b"\xff\xd9"
    )


def gif_bomb(width: int, height: int) -> bytes:
    """A ~30-byte GIF whose logical screen and one frame declare width x height."""
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", width, height, 0, 0, 0)
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, width, height, 0)
        + b"\x02\x02\x44\x01\x00"
        + b"\x3b"
    )


def webp_bomb(width: int, height: int) -> bytes:
    """A ~90-byte animated WebP: a width x height canvas (at most 16384 each) holding one
    1x1 frame. libwebp's animation decoder allocates the whole canvas when it is created."""

    def riff_chunk(kind: bytes, data: bytes) -> bytes:
        return kind + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) % 2 else b"")

    def u24(value: int) -> bytes:
        return value.to_bytes(3, "little")

    frame = real_image("image/webp", 1, 1)[12:]  # the 1x1 image's bitstream chunk
    canvas = b"\x02\x00\x00\x00" + u24(width - 1) + u24(height - 1)  # flags: animation
    anmf = u24(0) + u24(0) + u24(0) + u24(0) + u24(100) + b"\x00" + frame
    body = (
        b"WEBP"
        + riff_chunk(b"VP8X", canvas)
        + riff_chunk(b"ANIM", struct.pack("<IH", 0, 0))
        + riff_chunk(b"ANMF", anmf)
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


BOMBS = {
    "image/png": png_bomb,
    "image/jpeg": jpeg_bomb,
    "image/gif": gif_bomb,
    "image/webp": webp_bomb,
}
