"""Misbehaving OpenAI-compatible upstreams the simulator cannot play."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web


async def _one_chunk_then_drop(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    chunk = {
        "id": "chatcmpl-broken",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "Hello "},
                "finish_reason": None,
            }
        ],
    }
    await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await asyncio.sleep(0.05)
    # Mid-body, without the terminating chunk: the client sees an incomplete read.
    assert request.transport is not None
    request.transport.close()
    return response


@asynccontextmanager
async def running_broken_stream_upstream() -> AsyncIterator[str]:
    """An upstream whose streams send one delta and then drop the connection. Yields the
    base URL for OPENAI_BASE_URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _one_chunk_then_drop)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        await runner.cleanup()
