"""The LiteLLM proxy's config for `make bench-litellm`: one model, answered by the simulator;
LiteLLM's response cache in Redis, under a namespace of the run's own; nothing else. No
master key and no database: a proxy without them has no keys to check and no spend to record,
which is the closest LiteLLM comes to genmesh's guest path, and needs no PostgreSQL of its
own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

# The simulator's API key reaches the proxy through its environment (LiteLLM resolves
# `os.environ/NAME`), so the config file holds no secret.
SIM_KEY_ENV = "GENMESH_SIM_API_KEY"
# A killed run cannot delete its cache entries: they expire by themselves (a finished run
# deletes them).
CACHE_TTL_SECONDS = 3600


@dataclass(frozen=True)
class RedisTarget:
    host: str
    port: int
    db: int
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> RedisTarget:
        """redis://[:password@]host[:port][/db], as devstack.infra hands Redis out."""
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"LiteLLM's cache is given plain redis:// URLs only, not {url!r}")
        db = parts.path.strip("/")
        return cls(parts.hostname or "127.0.0.1", parts.port or 6379, int(db or 0), parts.password)


def proxy_config(
    model: str, simulator_url: str, redis: RedisTarget, namespace: str
) -> dict[str, Any]:
    """The config `litellm --config` reads: `model` served by the OpenAI-compatible simulator
    at `simulator_url`, every completion cached in `redis` under `namespace`."""
    cache_params: dict[str, Any] = {
        "type": "redis",
        "host": redis.host,
        "port": redis.port,
        "db": redis.db,
        "namespace": namespace,
        "ttl": CACHE_TTL_SECONDS,
    }
    if redis.password:
        cache_params["password"] = redis.password
    return {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": f"{simulator_url}/v1",
                    "api_key": f"os.environ/{SIM_KEY_ENV}",
                },
            }
        ],
        "litellm_settings": {"cache": True, "cache_params": cache_params},
        # Without a master key LiteLLM refuses to start unless told this is deliberate: the
        # proxy listens on loopback for the length of the run.
        "general_settings": {"dangerously_permit_weak_or_unset_master_key": True},
    }


def write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
