"""The generate routes' timeouts reach the generation service as its gRPC deadline: a real Envoy,
rendered from the template, in front of a GenerationService that records
`context.time_remaining()`. A route `timeout` alone does not do it (Envoy 1.40 then sends no
grpc-timeout and the handler sees None); the routes' `max_stream_duration` does."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from pydantic import ValidationError

from genmesh.generation.v1 import generation_pb2, generation_pb2_grpc
from services.gateway import render as render_module
from services.gateway.render import GatewaySettings, render
from tests.gateway.harness import (
    MAX_BYTES,
    SECRET,
    Gateway,
    hcm,
    http_filter,
    load,
    received,
    start_gateway,
    stop,
)

GENERATE = "/genmesh.generation.v1.GenerationService/Generate"
STREAM = "/genmesh.generation.v1.GenerationService/StreamGenerate"
# Client-sent deadlines: longer, much shorter, and one the header_mutation filter must not let
# through either (a nanosecond).
CLIENT_TIMEOUTS = [None, "100S", "1m", "1n"]


@dataclass
class RecordingGeneration(generation_pb2_grpc.GenerationServiceServicer):
    """Records `context.time_remaining()` per request text (each test uses its own text).
    `x-test-delay` makes a call sleep that long first; a call cut short is recorded as
    cancelled."""

    remaining: dict[str, float | None] = field(default_factory=dict)
    cancelled: dict[str, float] = field(default_factory=dict)

    async def _arrive(self, text: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.remaining[text] = context.time_remaining()
        delay = received(context).get("x-test-delay")
        if delay:
            started = time.monotonic()
            try:
                await asyncio.sleep(float(delay))
            except asyncio.CancelledError:
                self.cancelled[text] = time.monotonic() - started
                raise

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> generation_pb2.GenerateResponse:
        await self._arrive(request.text, context)
        return generation_pb2.GenerateResponse(text=request.text)

    async def StreamGenerate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[generation_pb2.StreamGenerateResponse]:
        await self._arrive(request.text, context)
        yield generation_pb2.StreamGenerateResponse(
            done=generation_pb2.GenerateResponse(text=request.text)
        )


@dataclass
class DeadlineUpstream:
    port: int
    generation: RecordingGeneration


@pytest.fixture(scope="module")
async def deadline_upstream() -> AsyncIterator[DeadlineUpstream]:
    """The recording GenerationService, with the health answers Envoy waits for (the telemetry
    cluster points here too; nothing in these tests calls it)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    generation = RecordingGeneration()
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(generation, server)
    health = HealthServicer()
    for name in (
        "genmesh.generation.v1.GenerationService",
        "genmesh.telemetry.v1.TelemetryService",
    ):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield DeadlineUpstream(port=port, generation=generation)
    await server.stop(grace=None)


def _keep_client_grpc_timeout(config: dict[str, Any]) -> None:
    """Take `remove: grpc-timeout` out of the edge header_mutation filter."""
    mutations = http_filter(config, "envoy.filters.http.header_mutation")["mutations"]
    before = mutations["request_mutations"]
    mutations["request_mutations"] = [m for m in before if m.get("remove") != "grpc-timeout"]
    assert len(mutations["request_mutations"]) == len(before) - 1


async def _gateway(
    upstream: DeadlineUpstream, directory: Path, **overrides: Any
) -> tuple[Gateway, Any]:
    return await start_gateway(directory, upstream.port, SECRET, MAX_BYTES, **overrides)


@pytest.fixture(scope="module")
async def timed_gateway(
    deadline_upstream: DeadlineUpstream,
    tmp_path_factory: pytest.TempPathFactory,
    descriptor_set: Path,
) -> AsyncIterator[Gateway]:
    """The rendered config as is, with Generate at 7 s and StreamGenerate at 9 s."""
    running, process = await _gateway(
        deadline_upstream,
        tmp_path_factory.mktemp("envoy-deadlines"),
        GATEWAY_GENERATE_TIMEOUT_SECONDS=7,
        GATEWAY_GENERATE_STREAM_TIMEOUT_SECONDS=9,
    )
    yield running
    stop(process)


@pytest.fixture(scope="module")
async def unstripped_gateway(
    deadline_upstream: DeadlineUpstream,
    tmp_path_factory: pytest.TempPathFactory,
    descriptor_set: Path,
) -> AsyncIterator[Gateway]:
    """As `timed_gateway`, but a client's grpc-timeout is no longer removed at the edge."""
    running, process = await _gateway(
        deadline_upstream,
        tmp_path_factory.mktemp("envoy-deadlines-unstripped"),
        edit=_keep_client_grpc_timeout,
        GATEWAY_GENERATE_TIMEOUT_SECONDS=7,
        GATEWAY_GENERATE_STREAM_TIMEOUT_SECONDS=9,
    )
    yield running
    stop(process)


@pytest.fixture(scope="module")
async def short_gateway(
    deadline_upstream: DeadlineUpstream,
    tmp_path_factory: pytest.TempPathFactory,
    descriptor_set: Path,
) -> AsyncIterator[Gateway]:
    """Generate at 2 s, and no StreamGenerate setting: the stream route takes the same."""
    running, process = await _gateway(
        deadline_upstream,
        tmp_path_factory.mktemp("envoy-deadlines-short"),
        GATEWAY_GENERATE_TIMEOUT_SECONDS=2,
    )
    yield running
    stop(process)


_counter = iter(range(1_000_000))


def _text() -> str:
    return f"deadline-{next(_counter)}"


async def _call(
    gateway: Gateway, path: str, text: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    url = "/api/generate:stream" if path == STREAM else "/api/generate"
    async with httpx.AsyncClient(base_url=gateway.url, timeout=20) as client:
        return await client.post(url, json={"text": text}, headers=headers or {})


def _client_headers(client_timeout: str | None) -> dict[str, str]:
    return {"grpc-timeout": client_timeout} if client_timeout else {}


# -- through Envoy ----------------------------------------------------------------------------


@pytest.mark.parametrize("client_timeout", CLIENT_TIMEOUTS)
@pytest.mark.parametrize(("path", "seconds"), [(GENERATE, 7), (STREAM, 9)])
async def test_the_route_timeout_is_the_services_deadline(
    timed_gateway: Gateway,
    deadline_upstream: DeadlineUpstream,
    path: str,
    seconds: int,
    client_timeout: str | None,
) -> None:
    text = _text()
    r = await _call(timed_gateway, path, text, _client_headers(client_timeout))
    assert r.status_code == 200, r.text
    remaining = deadline_upstream.generation.remaining[text]
    # The handler runs a few milliseconds after Envoy sent grpc-timeout: its route's value.
    assert remaining is not None
    assert seconds - 1.5 < remaining <= seconds


@pytest.mark.parametrize("client_timeout", ["100S", "1m"])
@pytest.mark.parametrize(("path", "seconds"), [(GENERATE, 7), (STREAM, 9)])
async def test_the_route_overwrites_a_client_grpc_timeout_even_without_the_edge_strip(
    unstripped_gateway: Gateway,
    deadline_upstream: DeadlineUpstream,
    path: str,
    seconds: int,
    client_timeout: str,
) -> None:
    # Belt and braces: the header_mutation filter removes a client's grpc-timeout, and the
    # route's max_stream_duration (without grpc_timeout_header_max) replaces one anyway.
    text = _text()
    r = await _call(unstripped_gateway, path, text, {"grpc-timeout": client_timeout})
    assert r.status_code == 200, r.text
    remaining = deadline_upstream.generation.remaining[text]
    assert remaining is not None
    assert seconds - 1.5 < remaining <= seconds


async def test_without_its_own_setting_the_stream_takes_the_generate_timeout(
    short_gateway: Gateway, deadline_upstream: DeadlineUpstream
) -> None:
    text = _text()
    r = await _call(short_gateway, STREAM, text)
    assert r.status_code == 200, r.text
    remaining = deadline_upstream.generation.remaining[text]
    assert remaining is not None
    assert 1.0 < remaining <= 2


@pytest.mark.parametrize("path", [GENERATE, STREAM])
async def test_a_call_past_its_deadline_is_504_and_the_handler_is_cancelled(
    short_gateway: Gateway, deadline_upstream: DeadlineUpstream, path: str
) -> None:
    text = _text()
    started = time.monotonic()
    r = await _call(short_gateway, path, text, {"x-test-delay": "6"})
    elapsed = time.monotonic() - started
    # Envoy's own 504 (UPSTREAM_TIMEOUT) or, when the service's deadline fires a moment first,
    # the transcoder's rendering of DEADLINE_EXCEEDED: a 504 with code 4 either way.
    assert r.status_code == 504, r.text
    assert r.json()["code"] == 4
    assert 1.5 < elapsed < 4
    deadline = time.monotonic() + 5
    while text not in deadline_upstream.generation.cancelled and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    # The handler stopped at the deadline instead of sleeping its 6 s.
    assert deadline_upstream.generation.cancelled[text] < 4


# -- the settings and the rendered routes -----------------------------------------------------


def _route(config: dict[str, Any], path: str) -> dict[str, Any]:
    vhost = hcm(config)["route_config"]["virtual_hosts"][0]
    (route,) = [r for r in vhost["routes"] if r["match"].get("path") == path]
    action: dict[str, Any] = route["route"]
    return action


def test_the_generate_timeouts_default_to_60_seconds(clean_env: pytest.MonkeyPatch) -> None:
    config = load(render(GatewaySettings()))
    for path in (GENERATE, STREAM):
        route = _route(config, path)
        assert route["timeout"] == "60s"
        # Only max_stream_duration: grpc_timeout_header_max would let a client's grpc-timeout
        # shorten the deadline.
        assert route["max_stream_duration"] == {"max_stream_duration": "60s"}


def test_each_generate_route_renders_its_own_setting(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GATEWAY_GENERATE_TIMEOUT_SECONDS", "45")
    clean_env.setenv("GATEWAY_GENERATE_STREAM_TIMEOUT_SECONDS", "240")
    config = load(render(GatewaySettings()))
    assert _route(config, GENERATE)["max_stream_duration"] == {"max_stream_duration": "45s"}
    assert _route(config, GENERATE)["timeout"] == "45s"
    assert _route(config, STREAM)["max_stream_duration"] == {"max_stream_duration": "240s"}
    assert _route(config, STREAM)["timeout"] == "240s"


def test_an_empty_stream_setting_means_the_generate_timeout(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("GATEWAY_GENERATE_TIMEOUT_SECONDS", "30")
    clean_env.setenv("GATEWAY_GENERATE_STREAM_TIMEOUT_SECONDS", "")
    settings = GatewaySettings()
    assert settings.stream_timeout_seconds == 30
    assert _route(load(render(settings)), STREAM)["max_stream_duration"] == {
        "max_stream_duration": "30s"
    }


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_GENERATE_TIMEOUT_SECONDS", "0"),
        ("GATEWAY_GENERATE_TIMEOUT_SECONDS", "301"),
        ("GATEWAY_GENERATE_TIMEOUT_SECONDS", "1.5"),
        ("GATEWAY_GENERATE_TIMEOUT_SECONDS", "60s"),
        ("GATEWAY_GENERATE_TIMEOUT_SECONDS", ""),
        ("GATEWAY_GENERATE_STREAM_TIMEOUT_SECONDS", "0"),
        ("GATEWAY_GENERATE_STREAM_TIMEOUT_SECONDS", "3601"),
        ("GATEWAY_GENERATE_STREAM_TIMEOUT_SECONDS", "1m"),
    ],
)
def test_bad_timeouts_are_refused_with_a_one_line_error(
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    name: str,
    value: str,
) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError):
        GatewaySettings()
    out = tmp_path / "envoy.yaml"
    with pytest.raises(SystemExit) as exited:
        render_module.main(["--out", str(out)])
    assert exited.value.code == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert err.startswith(f"gateway: {name}: ")
    assert len(err.strip().splitlines()) == 1


def test_only_the_generate_routes_carry_a_deadline(clean_env: pytest.MonkeyPatch) -> None:
    # The other routes keep the router's `timeout` (and its UPSTREAM_TIMEOUT 504): see the
    # README, "Deadlines", for why they do not get max_stream_duration yet.
    config = load(render(GatewaySettings()))
    vhost = hcm(config)["route_config"]["virtual_hosts"][0]
    carrying = {
        r["match"].get("path") for r in vhost["routes"] if "max_stream_duration" in r["route"]
    }
    assert carrying == {GENERATE, STREAM}
    assert json.dumps(config).count("grpc_timeout_header") == 0
