"""Sequential cache misses in `make bench`: what the mesh adds to the upstream's latency.

One request at a time, alternating: POST /api/generate through the mesh's Envoy with a prompt
never sent before (so it misses the cache and calls the simulator), then the same kind of chat
completion sent straight to the simulator, shaped as generation shapes it (its model, system
prompt and token limit, the same user text). The simulator answers after a fixed
BENCH_SIM_LATENCY_MS either way, so the difference between the two is the mesh's own cost:
Envoy, the rate-limit check, generation, the quota reservation and settlement, the cache
lookup and write. Both go over one keep-alive HTTP/1.1 connection each, from the same client.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.errors import BenchError
from bench.proc import CpuWindow
from bench.stats import distribution, fmt, per_unit_us, percentile
from bench.wrk import LATENCY_POINTS
from services.generation.pipeline import PipelineConfig
from services.generation.settings import GenerationSettings

WARMUP_PAIRS = 20
MESH = "miss via the mesh"
FLOOR = "miss via the floor"
# EchoRequest.lang that makes the floor's generation role (bench/floor_server.py) take the
# miss path.
FLOOR_MISS_LANG = "miss"
DIRECT = "simulator directly"


@dataclass
class Samples:
    # Through what is measured: the mesh (or, in `make bench-litellm`, the LiteLLM proxy).
    mesh_ms: list[float] = field(default_factory=list)
    direct_ms: list[float] = field(default_factory=list)
    # Mesh answers that came from the cache after all (a prompt seen before): not misses.
    cached: int = 0
    # CPU seconds by process over the measured pairs (the simulator's serves both calls).
    cpu: dict[str, float] = field(default_factory=dict)


def upstream_body(text: str, lang: str = "en") -> dict[str, Any]:
    """The chat completion generation sends for a text prompt, from its own settings'
    defaults (services/generation: model, system prompt, max_completion_tokens)."""
    fields = GenerationSettings.model_fields
    config = PipelineConfig(
        text_model=fields["openai_text_model"].default,
        vision_model=fields["openai_vision_model"].default,
        system_prompt=fields["gen_system_prompt"].default,
        max_tokens=fields["openai_max_tokens"].default,
    )
    return {
        "model": config.text_model,
        "messages": [
            {"role": "system", "content": config.system_message(lang)},
            {"role": "user", "content": text},
        ],
        "max_completion_tokens": config.max_tokens,
    }


# One request through the system under test for a prompt: its latency in ms, and whether its
# answer came from a cache after all (then the pair is no miss and is left out).
Via = Callable[[str], tuple[float, bool]]


def _via_mesh(mesh: httpx.Client, text: str) -> tuple[float, bool]:
    """POST /api/generate through the mesh's Envoy (`mesh`): the miss's latency in ms, and
    whether the answer came from the cache after all."""
    started = time.perf_counter()
    reply = mesh.post("/api/generate", json={"text": text, "lang": "en"})
    mesh_ms = (time.perf_counter() - started) * 1000
    if reply.status_code != 200:
        raise BenchError(f"miss via the mesh -> {reply.status_code} {reply.text[:300]}")
    return mesh_ms, bool(reply.json().get("cached"))


def _direct(direct: httpx.Client, text: str) -> float:
    """The same completion straight to the simulator: its latency in ms."""
    started = time.perf_counter()
    answer = direct.post("/v1/chat/completions", json=upstream_body(text))
    direct_ms = (time.perf_counter() - started) * 1000
    if answer.status_code != 200:
        raise BenchError(f"simulator -> {answer.status_code} {answer.text[:300]}")
    return direct_ms


def measure_pairs(
    via: Via, simulator_url: str, api_key: str, pairs: int, pids: Mapping[str, int]
) -> Samples:
    """WARMUP_PAIRS pairs, then `pairs` measured ones (a new prompt through `via`, then the
    same completion straight to the simulator), with the CPU each process in `pids` used over
    the measured ones. `make bench` measures the mesh this way, `make bench-litellm` the
    LiteLLM proxy (bench/litellm)."""
    run = uuid.uuid4().hex[:8]
    samples = Samples()
    auth = {"authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=simulator_url, timeout=60, headers=auth) as direct:
        for i in range(WARMUP_PAIRS):
            text = f"bench miss {run} warm-up {i}: name a colour"
            via(text)
            _direct(direct, text)
        with CpuWindow(pids) as cpu:
            for i in range(pairs):
                text = f"bench miss {run} {i}: name a colour"
                via_ms, cached = via(text)
                direct_ms = _direct(direct, text)
                if cached:
                    samples.cached += 1
                    continue
                samples.mesh_ms.append(via_ms)
                samples.direct_ms.append(direct_ms)
    samples.cpu = cpu.used
    return samples


def measure(
    gateway_url: str, simulator_url: str, api_key: str, pairs: int, pids: Mapping[str, int]
) -> Samples:
    """`measure_pairs` through the mesh's Envoy at `gateway_url`."""
    with httpx.Client(base_url=gateway_url, timeout=60) as mesh:
        return measure_pairs(
            lambda text: _via_mesh(mesh, text), simulator_url, api_key, pairs, pids
        )


def _via_floor(floor: httpx.Client, text: str) -> tuple[float, bool]:
    """A miss through the shape's floor (bench/floor_server.py): its latency in ms."""
    started = time.perf_counter()
    reply = floor.post("/api/echo", json={"text": text, "lang": FLOOR_MISS_LANG})
    floor_ms = (time.perf_counter() - started) * 1000
    if reply.status_code != 200:
        raise BenchError(f"miss via the floor -> {reply.status_code} {reply.text[:300]}")
    return floor_ms, False


def measure_floor(
    floor_url: str, simulator_url: str, api_key: str, pairs: int, pids: Mapping[str, int]
) -> Samples:
    """`measure_pairs` through the floor's Envoy at `floor_url`: what a miss cannot go below
    in the mesh's shape."""
    with httpx.Client(base_url=floor_url, timeout=60) as floor:
        return measure_pairs(
            lambda text: _via_floor(floor, text), simulator_url, api_key, pairs, pids
        )


def summarize(samples: Samples, sim_latency_ms: int, via: str = MESH) -> dict[str, Any]:
    """Medians and p99 of both sides, keyed by `via` (what the misses went through) and
    DIRECT, and what `via` added."""
    mesh, direct = samples.mesh_ms, samples.direct_ms
    if not mesh:
        raise BenchError("no cache miss was measured")
    figures: dict[str, dict[str, Any]] = {
        label: {
            "median_ms": statistics.median(values),
            "p99_ms": percentile(values, 0.99),
            "distribution_ms": distribution(values, LATENCY_POINTS),
        }
        for label, values in ((via, mesh), (DIRECT, direct))
    }
    return {
        "pairs": len(mesh),
        "cached": samples.cached,
        "sim_latency_ms": sim_latency_ms,
        "variants": figures,
        "added_median_ms": figures[via]["median_ms"] - figures[DIRECT]["median_ms"],
        "added_p99_ms": figures[via]["p99_ms"] - figures[DIRECT]["p99_ms"],
        "cpu_us_per_pair": {
            name: per_unit_us(used, len(mesh)) for name, used in samples.cpu.items()
        },
    }


def print_misses(
    figures: dict[str, Any],
    via: str = MESH,
    through: str = "the mesh's Envoy",
    who: str = "the mesh",
) -> None:
    """The table of `summarize`'s figures: `via` its label, `through` where the misses went,
    `who` what added the difference."""
    print(
        f"Sequential cache misses: {figures['pairs']} pairs, one request at a time, a new prompt "
        f"through {through} then the same chat completion straight to the simulator "
        f"(fixed upstream latency {figures['sim_latency_ms']} ms), after {WARMUP_PAIRS} "
        "warm-up pairs"
    )
    header = f"{'':<22} {'median ms':>10} {'p99 ms':>8}"
    print(header)
    print("-" * len(header))
    for label in (via, DIRECT):
        v = figures["variants"][label]
        print(f"{label:<22} {v['median_ms']:>10.2f} {v['p99_ms']:>8.2f}")
    print(
        f"{'added by ' + who:<22} {figures['added_median_ms']:>+10.2f} "
        f"{figures['added_p99_ms']:>+8.2f}"
    )
    cpu = ", ".join(f"{name} {fmt(us, 0, 0)}" for name, us in figures["cpu_us_per_pair"].items())
    print(f"  CPU µs per pair (the simulator serves both calls): {cpu}")
    if figures["cached"]:
        print(f"  {figures['cached']} answers came from the cache and were left out")
