"""HTTP/1.1 by hand, for what httpx cannot do: send a request's body in two parts with a
pause between them, reading the answer while still sending (as browsers do)."""

from __future__ import annotations

import asyncio
import contextlib


async def post_in_two_parts(
    host: str,
    port: int,
    path: str,
    body: bytes,
    first: int,
    *,
    chunked: bool = False,
    timeout: float = 10,
) -> tuple[int, bytes, bytes]:
    """POST `body`: the headers and its first `first` bytes at once, the rest half a second
    later, with a Content-Length or chunked. Returns the status, the raw response head and the
    response body (empty when the answer declares no length); TimeoutError means no answer
    at all."""
    reader, writer = await asyncio.open_connection(host, port)
    framing = "transfer-encoding: chunked" if chunked else f"content-length: {len(body)}"
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{framing}\r\n\r\n"

    def frame(part: bytes) -> bytes:
        return f"{len(part):x}\r\n".encode() + part + b"\r\n" if chunked and part else part

    async def send() -> None:
        writer.write(head.encode() + frame(body[:first]))
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.write(frame(body[first:]) + (b"0\r\n\r\n" if chunked else b""))
        await writer.drain()

    sending = asyncio.create_task(send())
    try:
        response_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=timeout)
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in response_head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        content = await asyncio.wait_for(reader.readexactly(length), timeout=timeout)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        writer.close()
    return int(response_head.split(b" ", 2)[1]), response_head, content
