"""Routes: the OpenAI-compatible /v1 API, /healthz, and the /_sim control plane."""

from __future__ import annotations

import asyncio
import hmac
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields

from aiohttp import web
from aiohttp.log import access_logger
from pydantic import ValidationError

from simulator import answers, wire
from simulator.faults import FaultInjector, FaultSpec
from simulator.settings import SimSettings

# Fixed creation stamps: real model listings don't change between calls either.
MODELS = (("gpt-4o-mini", 1721172741), ("gpt-4o", 1715367049))


@dataclass
class Stats:
    """What GET /_sim/stats reports (with the fault injector's `hanging`). Counters run from
    start-up or the last reset; `in_flight` is a gauge, which a reset leaves alone."""

    requests: int = 0  # chat-completion calls that got past authentication
    completions: int = 0  # of which answered normally (streamed or not; a stream once begun)
    streams: int = 0  # of which streamed
    faults_injected: int = 0  # of which drew a fault
    rejected: int = 0  # of which failed validation (400)
    # Of which the client went away before the answer was complete: while the request waited
    # (latency, a hang) or mid-stream. Each request counts at most once.
    cancelled: int = 0
    # Chat-completion calls being handled right now (a stream until its last byte is written).
    in_flight: int = field(default=0, metadata={"gauge": True})

    def reset(self) -> None:
        for f in fields(self):
            if not f.metadata.get("gauge"):
                setattr(self, f.name, f.default)


SETTINGS = web.AppKey("settings", SimSettings)
FAULTS = web.AppKey("faults", FaultInjector)
STATS = web.AppKey("stats", Stats)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On /v1/*: check the API key, and turn aiohttp's plain-text 404/405 into OpenAI's JSON."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    key = request.app[SETTINGS].api_key
    if key is not None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return wire.error_response(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        # Constant-time, out of habit: this key guards nothing of value.
        if not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
            return wire.error_response(401, "Incorrect API key provided.", code="invalid_api_key")
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return wire.error_response(
            exc.status, f"Invalid URL ({request.method} {request.path})", headers=headers
        )


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    # The SDK surfaces x-request-id on errors; services may log it.
    if request.path.startswith("/v1/"):
        response.headers.setdefault("x-request-id", f"req_{uuid.uuid4().hex}")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATS]
    stats.requests += 1
    stats.in_flight += 1
    try:
        return await _chat_completion(request, stats)
    except asyncio.CancelledError:
        # The runner's handler_cancellation: the client disconnected while we were waiting.
        stats.cancelled += 1
        raise
    finally:
        stats.in_flight -= 1


async def _chat_completion(request: web.Request, stats: Stats) -> web.StreamResponse:
    settings, faults = request.app[SETTINGS], request.app[FAULTS]
    try:
        chat = wire.parse_chat_request(await request.read())
    except wire.RequestError as exc:
        stats.rejected += 1
        return exc.response()

    if settings.latency_ms:
        await asyncio.sleep(settings.latency_ms / 1000)
    injection = faults.draw()
    if injection is not None:
        stats.faults_injected += 1
        spec = injection.spec
        if spec.latency_ms:
            await asyncio.sleep(spec.latency_ms / 1000)
        if spec.hang:
            await faults.hang(injection)
            return wire.error_response(
                503,
                "Request released: the simulator's hang fault was cleared.",
                type_="server_error",
            )
        if spec.status:
            return wire.fault_response(spec.status, spec.retry_after)

    answer = answers.compose(chat)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    stats.completions += 1
    if not chat.stream:
        return web.json_response(wire.completion(completion_id, created, chat.model, answer))

    stats.streams += 1
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    events = wire.stream_events(
        completion_id, created, chat.model, answer, include_usage=chat.include_usage
    )
    try:
        for i, event in enumerate(events):
            if i and settings.stream_chunk_delay_ms:
                await asyncio.sleep(settings.stream_chunk_delay_ms / 1000)
            await response.write(event)
        await response.write_eof()
    except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one too
        # The client left mid-stream; nothing left to tell it. Returning (not raising) means
        # the CancelledError branch above cannot count this request a second time.
        stats.cancelled += 1
    return response


async def list_models(request: web.Request) -> web.Response:
    data = [{"id": m, "object": "model", "created": c, "owned_by": "system"} for m, c in MODELS]
    return web.json_response({"object": "list", "data": data})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[FAULTS].spec.model_dump())


async def set_faults(request: web.Request) -> web.Response:
    try:
        spec = FaultSpec.model_validate_json(await request.read())
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or None
        message = f"{field}: {error['msg']}" if field else error["msg"]
        return wire.error_response(400, message, param=field)
    request.app[FAULTS].replace(spec)
    return web.json_response(spec.model_dump())


async def clear_faults(request: web.Request) -> web.Response:
    request.app[FAULTS].replace(FaultSpec())
    return web.json_response(FaultSpec().model_dump())


async def get_stats(request: web.Request) -> web.Response:
    counters = asdict(request.app[STATS])
    return web.json_response(counters | {"hanging": request.app[FAULTS].hanging})


async def reset_stats(request: web.Request) -> web.Response:
    request.app[STATS].reset()
    return await get_stats(request)


# Largest request body. aiohttp's default (1 MiB) refused, with a 413, any image over about
# 750 KB; the real API takes far larger ones, and genmesh sends up to 5 MiB of image as a
# base64 data URL (about 6.7 MiB) plus the prompt.
MAX_REQUEST_BYTES = 32 * 1024 * 1024


async def _release_hung(app: web.Application) -> None:
    # Runs before the runner waits for in-flight requests, so hung ones don't stall shutdown.
    app[FAULTS].release_all()


def create_app(settings: SimSettings | None = None) -> web.Application:
    """The simulator as an aiohttp app; `settings` defaults to the SIM_* environment."""
    if settings is None:
        settings = SimSettings()
    startup_faults = FaultSpec(
        status=settings.fault_status,
        rate=settings.fault_rate,
        latency_ms=settings.fault_latency_ms,
        retry_after=settings.fault_retry_after,
        hang=settings.fault_hang,
    )
    app = web.Application(middlewares=[openai_edge], client_max_size=MAX_REQUEST_BYTES)
    app[SETTINGS] = settings
    app[FAULTS] = FaultInjector(startup_faults, random.Random(settings.seed))
    app[STATS] = Stats()
    app.on_response_prepare.append(_add_request_id)
    app.on_shutdown.append(_release_hung)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/_sim/faults", get_faults)
    app.router.add_post("/_sim/faults", set_faults)
    app.router.add_delete("/_sim/faults", clear_faults)
    app.router.add_get("/_sim/stats", get_stats)
    app.router.add_delete("/_sim/stats", reset_stats)
    app.router.add_post("/_sim/reset", reset_stats)
    return app


async def start(settings: SimSettings) -> tuple[web.AppRunner, str]:
    """Serve on settings.host:settings.port (0 = any free port). Returns the runner, for
    `await runner.cleanup()`, and the root URL actually bound; the SDK's base URL is that + /v1."""
    runner = web.AppRunner(
        create_app(settings),
        # Drop hung or streaming handlers whose client went away instead of finishing them.
        handler_cancellation=True,
        access_log=access_logger if settings.access_log else None,
        shutdown_timeout=5,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    host = f"[{host}]" if ":" in host else host
    return runner, f"http://{host}:{port}"
