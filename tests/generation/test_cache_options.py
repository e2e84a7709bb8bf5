"""Per-request cache control over gRPC: no-cache, no-store, per-user scope and tags, in the
request body or as a standard Cache-Control header."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest

from genmesh.generation.v1 import generation_pb2 as gen
from services.common.identity import USER_ID_HEADER
from tests.generation.conftest import Generation, Sim, service_error

pytestmark = pytest.mark.integration


def prompt(**cache: Any) -> gen.GenerateRequest:
    return gen.GenerateRequest(
        text=f"Name a river {uuid.uuid4()}", lang="en", cache=gen.CacheOptions(**cache)
    )


def as_user(g: Generation, user_id: str) -> tuple[tuple[str, str], ...]:
    return (*g.guest, (USER_ID_HEADER, user_id))


async def test_no_cache_fetches_a_fresh_answer_that_replaces_the_entry(
    make_generation: Any, sim: Sim
) -> None:
    async with make_generation(sim) as g:
        request = prompt()
        await g.stub.Generate(request, metadata=g.guest)
        fresh = prompt(no_cache=True)
        fresh.text = request.text
        reply = await g.stub.Generate(fresh, metadata=g.guest)
        assert reply.cached is False
        assert await sim.requests() == 2
        # ... and what it fetched is what the next default request finds.
        again = await g.stub.Generate(request, metadata=g.guest)
        assert again.cached is True and again.text == reply.text
        assert await sim.requests() == 2


async def test_no_store_writes_nothing(make_generation: Any, sim: Sim) -> None:
    async with make_generation(sim) as g:
        request = prompt(no_store=True)
        first = await g.stub.Generate(request, metadata=g.guest)
        second = await g.stub.Generate(request, metadata=g.guest)
        assert (first.cached, second.cached) == (False, False)
        assert await sim.requests() == 2


async def test_cache_control_header_directives_are_honoured(make_generation: Any, sim: Sim) -> None:
    async with make_generation(sim) as g:
        request = prompt()
        no_store = (*g.guest, ("cache-control", "no-store"))
        await g.stub.Generate(request, metadata=no_store)
        assert (await g.stub.Generate(request, metadata=g.guest)).cached is False
        no_cache = (*g.guest, ("cache-control", "max-age=0, no-cache"))
        assert (await g.stub.Generate(request, metadata=no_cache)).cached is False
        assert await sim.requests() == 3


async def test_a_per_user_entry_is_hit_only_by_its_owner(make_generation: Any, sim: Sim) -> None:
    async with make_generation(sim) as g:
        mine = prompt(scope=gen.CACHE_SCOPE_USER)
        alice, bob = as_user(g, f"alice-{uuid.uuid4()}"), as_user(g, f"bob-{uuid.uuid4()}")
        await g.stub.Generate(mine, metadata=alice)
        assert (await g.stub.Generate(mine, metadata=alice)).cached is True
        assert (await g.stub.Generate(mine, metadata=bob)).cached is False
        shared = gen.GenerateRequest(text=mine.text, lang="en")
        assert (await g.stub.Generate(shared, metadata=alice)).cached is False
        assert await sim.requests() == 3


async def test_a_guest_cannot_ask_for_a_per_user_entry(make_generation: Any, sim: Sim) -> None:
    async with make_generation(sim) as g:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await g.stub.Generate(prompt(scope=gen.CACHE_SCOPE_USER), metadata=g.guest)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in service_error(caught.value).violations] == ["cache.scope"]
    assert await sim.requests() == 0


async def test_request_tags_invalidate_their_entries(make_generation: Any, sim: Sim) -> None:
    async with make_generation(sim) as g:
        tag = f"campaign-{uuid.uuid4().hex[:8]}"
        tagged, plain = prompt(tags=[tag]), prompt()
        await g.stub.Generate(tagged, metadata=g.guest)
        await g.stub.Generate(plain, metadata=g.guest)
        removed = await g.admin.InvalidateCache(
            gen.InvalidateCacheRequest(tag=tag), metadata=g.admin_md
        )
        assert removed.removed == 1
        assert (await g.stub.Generate(tagged, metadata=g.guest)).cached is False
        assert (await g.stub.Generate(plain, metadata=g.guest)).cached is True


async def test_bad_tags_are_refused_naming_the_field(make_generation: Any, sim: Sim) -> None:
    async with make_generation(sim) as g:
        for tags in (["Not A Slug"], [f"t{i}" for i in range(9)], ["same", "same"]):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await g.stub.Generate(prompt(tags=tags), metadata=g.guest)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            fields = {v.field for v in service_error(caught.value).violations}
            assert any(f.startswith("cache.tags") for f in fields), fields
