"""The simulator, driven in-process through the official openai SDK (plus raw HTTP for the
control plane and for malformed requests the SDK would never send)."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from simulator import SimSettings, create_app, start
from tests.simulator.support import sim_settings

USER = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Sim:
    url: str
    http: aiohttp.ClientSession
    client: openai.AsyncOpenAI

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, **kwargs) as resp:
            return resp.status, await resp.json()

    async def set_faults(self, **faults: Any) -> None:
        status, body = await self.call("POST", "/_sim/faults", json=faults)
        assert status == 200, body

    async def stats(self) -> dict[str, int]:
        _, body = await self.call("GET", "/_sim/stats")
        return dict(body)

    async def ask(self, messages: list[dict[str, Any]] = USER, **kwargs: Any) -> Any:
        return await self.client.chat.completions.create(
            model="gpt-4o-mini",
            messages=messages,  # type: ignore[arg-type]  # plain dicts, as services build them
            **kwargs,
        )


async def _running(settings: SimSettings, api_key: str = "test") -> AsyncIterator[Sim]:
    runner, url = await start(settings)
    try:
        async with aiohttp.ClientSession() as http:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
            try:
                yield Sim(url, http, client)
            finally:
                await client.close()
    finally:
        await runner.cleanup()


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    async for running in _running(sim_settings()):
        yield running


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


# --- completions -------------------------------------------------------------------------------


async def test_text_completion_is_well_formed_and_deterministic(sim: Sim) -> None:
    first = await sim.ask()
    again = await sim.ask()
    other = await sim.ask([{"role": "user", "content": "Tell me about penguins."}])

    assert first.object == "chat.completion"
    assert first.id.startswith("chatcmpl-")
    assert first.model == "gpt-4o-mini"
    choice = first.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert choice.message.content
    assert "capital of France" in choice.message.content
    assert first.usage is not None
    assert first.usage.prompt_tokens >= 1
    assert first.usage.completion_tokens == len(choice.message.content.split())
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens

    assert again.choices[0].message.content == choice.message.content
    assert again.id != first.id
    assert other.choices[0].message.content != choice.message.content


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _picture_question(image_url: str) -> list[dict[str, Any]]:
    parts = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    return [{"role": "user", "content": parts}]


async def test_content_parts_and_image_data_url(sim: Sim) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(100)
    answer = await sim.ask(
        _picture_question("data:image/png;base64," + base64.b64encode(png).decode())
    )
    content = answer.choices[0].message.content
    assert "image/png image of 108 bytes" in content
    assert "https://example.com/cat.jpg" in content
    assert "What is in this picture?" in content
    assert answer.usage.prompt_tokens > len(content.split())  # images cost tokens

    same_size = _data_url(bytes(108))
    assert (await sim.ask(_picture_question(same_size))).choices[0].message.content != content


async def test_system_language_and_max_tokens(sim: Sim) -> None:
    messages = [{"role": "system", "content": "Answer in pt-BR."}, *USER]
    assert "pt-BR" in (await sim.ask(messages)).choices[0].message.content

    short = await sim.ask(max_completion_tokens=3, user="u-1", temperature=0.2)
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3
    assert len(short.choices[0].message.content.split()) == 3
    legacy = await sim.ask(max_tokens=3)
    assert legacy.choices[0].message.content == short.choices[0].message.content


async def test_streaming_matches_non_streaming(sim: Sim) -> None:
    plain = await sim.ask()
    stream = await sim.ask(stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]

    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # really streamed, not one blob
    assert "".join(deltas) == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage == plain.usage

    no_usage = [c async for c in await sim.ask(stream=True)]
    assert all(c.choices and c.usage is None for c in no_usage)
    assert (await sim.stats())["streams"] == 2


async def test_stream_is_server_sent_events(sim: Sim) -> None:
    body = {"model": "gpt-4o", "messages": USER, "stream": True}
    async with sim.http.post(f"{sim.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        text = await resp.text()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


async def test_models_and_health(sim: Sim) -> None:
    models = [m.id async for m in sim.client.models.list()]
    assert {"gpt-4o-mini", "gpt-4o"} <= set(models)
    assert await sim.call("GET", "/healthz") == (200, {"status": "ok"})


# --- validation --------------------------------------------------------------------------------

IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%not-base64%%%"}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": USER}, None),
        ({"model": "gpt-4o-mini"}, "messages"),
        ({"model": "gpt-4o-mini", "messages": []}, "messages"),
        ({"model": 7, "messages": USER}, "model"),
        ({"model": "m", "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "video"}]}]},
            "messages[0].content[0].type",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": [IMG]}]},
            "messages[0].content[0].image_url.url",
        ),
        ({"model": "m", "messages": USER, "stream_options": {"include_usage": True}}, None),
        ({"model": "m", "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": USER, "temperature": 3}, "temperature"),
        ({"model": "m", "messages": USER, "stream": "yes"}, "stream"),
    ],
)
async def test_bad_requests_get_openai_400s(
    sim: Sim, body: dict[str, Any], param: str | None
) -> None:
    status, error = await sim.call("POST", "/v1/chat/completions", json=body)
    assert status == 400
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"]
    assert error["error"]["code"] is None
    if param is not None:
        assert error["error"]["param"] == param
    stats = await sim.stats()
    assert stats["rejected"] == 1
    assert stats["completions"] == 0


async def test_bad_requests_through_sdk_and_raw(sim: Sim) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sim.ask([])
    assert caught.value.param == "messages"

    status, error = await sim.call("POST", "/v1/chat/completions", data=b"{not json")
    assert status == 400
    assert "JSON" in error["error"]["message"]

    status, error = await sim.call("GET", "/v1/chat/completions")
    assert status == 405
    assert "error" in error
    status, error = await sim.call("GET", "/v1/nowhere")
    assert status == 404
    assert error["error"]["type"] == "invalid_request_error"


# --- faults ------------------------------------------------------------------------------------


async def test_injected_500(sim: Sim) -> None:
    await sim.set_faults(status=500, rate=1.0)
    with pytest.raises(openai.InternalServerError) as caught:
        await sim.ask()
    assert caught.value.status_code == 500
    assert caught.value.type == "server_error"
    with pytest.raises(openai.InternalServerError):
        await sim.ask(stream=True)

    status, _ = await sim.call("DELETE", "/_sim/faults")
    assert status == 200
    assert (await sim.ask()).choices[0].message.content
    stats = await sim.stats()
    assert stats["requests"] == 3
    assert stats["faults_injected"] == 2


async def test_injected_429_with_retry_after(sim: Sim) -> None:
    await sim.set_faults(status=429, retry_after=7)
    assert await sim.call("GET", "/_sim/faults") == (
        200,
        {"status": 429, "rate": 1.0, "latency_ms": 0, "retry_after": 7, "hang": False},
    )
    with pytest.raises(openai.RateLimitError) as caught:
        await sim.ask()
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "rate_limit_exceeded"


async def test_fault_rate_is_a_probability(sim: Sim) -> None:
    await sim.set_faults(status=503, rate=0.0)
    assert (await sim.ask()).choices

    await sim.set_faults(status=503, rate=0.5)
    outcomes = []
    for _ in range(40):
        try:
            await sim.ask()
            outcomes.append(True)
        except openai.InternalServerError:
            outcomes.append(False)
    # Seeded dice: both outcomes show up (all-equal would be a 2**-39 fluke anyway).
    assert True in outcomes
    assert False in outcomes
    assert (await sim.stats())["faults_injected"] == outcomes.count(False)


async def test_latency(sim: Sim) -> None:
    await sim.set_faults(latency_ms=200)
    began = time.monotonic()
    answer = await sim.ask()
    assert time.monotonic() - began >= 0.15
    assert answer.choices[0].message.content


async def test_hang_is_released_by_clearing_faults(sim: Sim) -> None:
    await sim.set_faults(hang=True)
    async with asyncio.timeout(10):
        pending = asyncio.create_task(sim.ask())
        await _eventually(lambda: _hanging(sim, 1))
        assert not pending.done()
        await sim.call("DELETE", "/_sim/faults")
        with pytest.raises(openai.InternalServerError) as caught:
            await pending
    assert caught.value.status_code == 503
    assert (await sim.ask()).choices


async def test_hung_request_given_up_by_client_is_dropped(sim: Sim) -> None:
    await sim.set_faults(hang=True)
    impatient = sim.client.with_options(timeout=0.3)
    async with asyncio.timeout(10):
        with pytest.raises(openai.APITimeoutError):
            await impatient.chat.completions.create(model="gpt-4o-mini", messages=USER)  # type: ignore[arg-type]
        await _eventually(lambda: _hanging(sim, 0))


async def test_shutdown_releases_hung_requests() -> None:
    runner, url = await start(sim_settings(fault_hang=True))
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0)
    try:
        try:
            async with aiohttp.ClientSession() as http, asyncio.timeout(10):
                pending = asyncio.create_task(
                    client.chat.completions.create(model="gpt-4o-mini", messages=USER)  # type: ignore[arg-type]
                )
                await _eventually(lambda: _hanging(Sim(url, http, client), 1))
        finally:
            await runner.cleanup()  # the shutdown under test: must not wait on the hung call
        async with asyncio.timeout(10):
            with pytest.raises(openai.InternalServerError):
                await pending
    finally:
        await client.close()


async def _hanging(sim: Sim, count: int) -> bool:
    return (await sim.stats())["hanging"] == count


# --- cancellations -----------------------------------------------------------------------------


async def _in_flight(sim: Sim, count: int) -> bool:
    return (await sim.stats())["in_flight"] == count


async def _settled(sim: Sim) -> dict[str, int]:
    """Stats once no chat completion is open any more (the server has seen every disconnect)."""
    await _eventually(lambda: _in_flight(sim, 0))
    return await sim.stats()


async def _abandon_while_waiting(sim: Sim) -> None:
    """Send a chat completion, wait until the simulator holds it, then hang up: cancelling the
    task closes the client's connection, as a caller whose deadline ran out does."""
    body = {"model": "gpt-4o-mini", "messages": USER}

    async def post() -> None:
        async with http.post(f"{sim.url}/v1/chat/completions", json=body) as resp:
            await resp.read()

    async with aiohttp.ClientSession() as http:
        pending = asyncio.create_task(post())
        await _eventually(lambda: _in_flight(sim, 1))
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending


async def test_normal_requests_are_not_cancelled(sim: Sim) -> None:
    assert (await sim.ask()).choices
    assert [chunk async for chunk in await sim.ask(stream=True)]
    await sim.set_faults(status=500)
    with pytest.raises(openai.InternalServerError):
        await sim.ask()
    stats = await _settled(sim)
    assert stats["requests"] == 3
    assert stats["cancelled"] == 0


async def test_client_leaving_during_latency_is_counted_once(sim: Sim) -> None:
    await sim.set_faults(latency_ms=60_000)
    async with asyncio.timeout(10):
        await _abandon_while_waiting(sim)
        stats = await _settled(sim)
    assert stats["cancelled"] == 1
    assert stats["requests"] == 1
    assert stats["completions"] == 0

    await sim.call("DELETE", "/_sim/faults")
    assert (await sim.ask()).choices
    assert (await _settled(sim))["cancelled"] == 1


async def test_client_leaving_during_a_hang_is_counted_once(sim: Sim) -> None:
    await sim.set_faults(hang=True)
    async with asyncio.timeout(10):
        await _abandon_while_waiting(sim)
        await _eventually(lambda: _hanging(sim, 0))
        stats = await _settled(sim)
    assert stats["cancelled"] == 1
    assert stats["faults_injected"] == 1

    # The SDK giving up on its own timeout is the same disconnect.
    impatient = sim.client.with_options(timeout=0.3)
    async with asyncio.timeout(10):
        with pytest.raises(openai.APITimeoutError):
            await impatient.chat.completions.create(model="gpt-4o-mini", messages=USER)  # type: ignore[arg-type]
        assert (await _settled(sim))["cancelled"] == 2


async def _leave_mid_stream(sim: Sim) -> None:
    """Read the first chunk of a stream, close it, and check that counted one cancellation."""
    async with asyncio.timeout(10):
        stream = await sim.ask(stream=True)
        first = await anext(aiter(stream))
        assert first.choices[0].delta.role == "assistant"
        assert (await sim.stats())["in_flight"] == 1
        await stream.close()
        stats = await _settled(sim)
    assert stats["cancelled"] == 1
    assert stats["streams"] == 1

    fast = [c async for c in await sim.ask(stream=True, max_completion_tokens=3)]
    assert fast[-1].choices[0].finish_reason == "length"
    assert (await _settled(sim))["cancelled"] == 1


async def test_client_leaving_mid_stream_is_counted_once() -> None:
    # Slow chunks, so the stream is surely still going when the client hangs up.
    async for sim in _running(sim_settings(stream_chunk_delay_ms=200)):
        await _leave_mid_stream(sim)


async def test_write_to_a_gone_client_is_counted_once() -> None:
    # Without handler cancellation (the app in another runner) the handler learns that the
    # client left from the failed write instead of a CancelledError.
    runner = web.AppRunner(create_app(sim_settings(stream_chunk_delay_ms=200)))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        async with aiohttp.ClientSession() as http:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0)
            try:
                await _leave_mid_stream(Sim(url, http, client))
            finally:
                await client.close()
    finally:
        await runner.cleanup()


async def test_cancelled_is_reset_but_in_flight_is_not(sim: Sim) -> None:
    await sim.set_faults(hang=True)
    async with asyncio.timeout(10):
        await _abandon_while_waiting(sim)
        assert (await _settled(sim))["cancelled"] == 1
        pending = asyncio.create_task(sim.ask())
        await _eventually(lambda: _in_flight(sim, 1))
        for method, path in (("DELETE", "/_sim/stats"), ("POST", "/_sim/reset")):
            status, zeroed = await sim.call(method, path)
            assert status == 200
            assert zeroed["cancelled"] == 0
            assert zeroed["in_flight"] == 1  # a gauge: the hung call is still open
        await sim.call("DELETE", "/_sim/faults")
        with pytest.raises(openai.InternalServerError):
            await pending
    stats = await _settled(sim)
    assert stats["in_flight"] == 0
    assert stats["cancelled"] == 0


@pytest.mark.parametrize(
    "body",
    [
        b'{"status": "500"}',
        b'{"status": 200}',
        b'{"status": 700}',
        b'{"rate": 1.5}',
        b'{"rate": -0.1}',
        b'{"latency_ms": -1}',
        b'{"latency_ms": 1.5}',
        b'{"retry_after": true}',
        b'{"hang": "yes"}',
        b'{"stauts": 500}',
        b"[]",
        b"not json",
    ],
)
async def test_bad_fault_json_is_rejected(sim: Sim, body: bytes) -> None:
    status, error = await sim.call("POST", "/_sim/faults", data=body)
    assert status == 400
    assert error["error"]["message"]
    _, faults = await sim.call("GET", "/_sim/faults")
    assert faults["status"] == 0
    assert not faults["hang"]


async def test_stats_count_and_reset(sim: Sim) -> None:
    for _ in range(3):
        await sim.ask()
    await sim.client.models.list()  # not a chat completion
    stats = await sim.stats()
    assert stats["requests"] == 3
    assert stats["completions"] == 3

    status, zeroed = await sim.call("POST", "/_sim/reset")
    assert status == 200
    assert zeroed["requests"] == 0
    await sim.ask()
    assert (await sim.stats())["requests"] == 1
    await sim.call("DELETE", "/_sim/stats")
    assert (await sim.stats())["requests"] == 0


# --- settings ----------------------------------------------------------------------------------


async def test_api_key_is_enforced_when_set() -> None:
    async for sim in _running(sim_settings(api_key="sekret"), api_key="sekret"):
        assert (await sim.ask()).choices

        wrong = sim.client.with_options(api_key="wrong")
        with pytest.raises(openai.AuthenticationError) as caught:
            await wrong.chat.completions.create(model="gpt-4o-mini", messages=USER)  # type: ignore[arg-type]
        assert caught.value.code == "invalid_api_key"

        status, error = await sim.call("GET", "/v1/models")
        assert status == 401
        assert error["error"]["type"] == "invalid_request_error"
        assert (await sim.call("GET", "/healthz"))[0] == 200
        assert (await sim.call("GET", "/_sim/stats"))[0] == 200


async def test_any_key_is_accepted_when_unset(sim: Sim) -> None:
    anything = sim.client.with_options(api_key="whatever")
    assert (await anything.chat.completions.create(model="gpt-4o", messages=USER)).choices  # type: ignore[arg-type]


async def test_faults_and_latency_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "SIM_PORT": "0",
        "SIM_API_KEY": "",  # empty counts as unset
        "SIM_FAULT_STATUS": "503",
        "SIM_FAULT_RETRY_AFTER": "2",
        "SIM_FAULT_RATE": "1",
        "SIM_LATENCY_MS": "0",
        "SIM_SEED": "7",
    }.items():
        monkeypatch.setenv(name, value)
    settings = SimSettings()
    assert settings.fault_status == 503
    assert settings.host == "127.0.0.1"
    async for sim in _running(settings):
        with pytest.raises(openai.InternalServerError) as caught:
            await sim.ask()
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "2"


def test_bad_environment_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_FAULT_RATE", "2")
    with pytest.raises(ValueError, match="fault_rate"):
        SimSettings()


async def test_python_dash_m_serves_and_stops_on_sigterm() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIM_")} | {"SIM_PORT": "0"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulator",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(20):
            line = (await proc.stderr.readline()).decode()
            match = re.search(r"listening on (http://\S+)", line)
            assert match, line
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{match[1]}/healthz") as resp,
            ):
                assert resp.status == 200
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
