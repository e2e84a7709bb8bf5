"""What `make bench-litellm` starts beside bench.stack's private mesh: Redis for LiteLLM's cache
(the mesh's, under a namespace of the run's own; a private redis-server only when the mesh
has none), the proxy's config and the proxy itself, pointed at the mesh's simulator. Stopped,
and the cache entries deleted, when the block ends, however it ends."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bench.litellm import config, proxy
from bench.litellm.settings import LitellmSettings
from bench.misses import upstream_body
from bench.stack import Stack
from devstack import infra


@dataclass
class LitellmSide:
    url: str
    version: str
    # The config as written, its Redis password (if any) masked: for the results.
    config: dict[str, Any]
    # The processes whose CPU is LiteLLM's to pay: the proxy, and Redis when we started it.
    pids: dict[str, int] = field(default_factory=dict)


def model() -> str:
    """The model genmesh asks the upstream for: the proxy serves it under the same name, so
    the same chat completion (bench.misses.upstream_body) goes to either."""
    name: str = upstream_body("")["model"]
    return name


@contextlib.contextmanager
def _cache_redis(stack: Stack) -> Iterator[tuple[infra.Server, bool]]:
    """The mesh's Redis, else a private one; the flag says whether this run started it."""
    if stack.redis is not None:
        yield stack.redis, stack.redis.process is not None
        return
    own = infra.private_redis(stack.scratch)
    if own is None:
        raise infra.InfraError(
            "LiteLLM's cache needs Redis: set REDIS_URL, start one on 127.0.0.1:6379 or install "
            "redis-server (apt-get install redis-server)"
        )
    try:
        yield own, True
    finally:
        own.stop()


def _masked(written: dict[str, Any]) -> dict[str, Any]:
    params = written["litellm_settings"]["cache_params"]
    if "password" not in params:
        return written
    cache = {**written["litellm_settings"], "cache_params": {**params, "password": "***"}}
    return {**written, "litellm_settings": cache}


@contextlib.contextmanager
def litellm_beside(stack: Stack, settings: LitellmSettings) -> Iterator[LitellmSide]:
    namespace = f"genmesh-bench-litellm-{uuid.uuid4().hex[:8]}"
    with _cache_redis(stack) as (redis, ours):
        written = config.proxy_config(
            model(),
            stack.config.simulator_url,
            config.RedisTarget.from_url(redis.url),
            namespace,
        )
        path = config.write(stack.scratch / "litellm.yaml", written)
        env = proxy.proxy_env(stack.config.simulator_api_key)
        try:
            print("==> starting the LiteLLM proxy", flush=True)
            with proxy.running(settings.binary, path, env, stack.config.log_dir) as running:
                side = LitellmSide(
                    running.url,
                    proxy.version(settings.binary),
                    _masked(written),
                    {"litellm": running.pid},
                )
                if ours and redis.process is not None:
                    side.pids["redis"] = redis.process.pid
                yield side
        finally:
            # Only the run's own keys: the Redis may be shared (never FLUSHDB).
            asyncio.run(infra.delete_keys(redis.url, f"{namespace}:"))
