"""Sequential cache misses through the LiteLLM proxy against the same chat completion sent to
the simulator directly, as bench/misses.py measures genmesh's: the latency the proxy adds.
The request is the chat completion itself (bench.misses.upstream_body), which the proxy
forwards as it is, so the two sides of a pair differ only by the proxy."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx

from bench import misses
from bench.errors import BenchError
from bench.litellm.cache_hits import CACHE_KEY_HEADER, PATH

LABEL = "miss via LiteLLM"


def _via_proxy(proxy: httpx.Client, text: str) -> tuple[float, bool]:
    started = time.perf_counter()
    reply = proxy.post(PATH, json=misses.upstream_body(text))
    elapsed_ms = (time.perf_counter() - started) * 1000
    if reply.status_code != 200:
        raise BenchError(f"miss via LiteLLM -> {reply.status_code} {reply.text[:300]}")
    return elapsed_ms, CACHE_KEY_HEADER in reply.headers


def measure(
    proxy_url: str,
    simulator_url: str,
    api_key: str,
    pairs: int,
    pids: Mapping[str, int],
    sim_latency_ms: int,
) -> dict[str, Any]:
    with httpx.Client(base_url=proxy_url, timeout=60) as proxy:
        samples = misses.measure_pairs(
            lambda text: _via_proxy(proxy, text), simulator_url, api_key, pairs, pids
        )
    figures = misses.summarize(samples, sim_latency_ms, via=LABEL)
    misses.print_misses(figures, via=LABEL, through="the LiteLLM proxy", who="LiteLLM")
    return figures
