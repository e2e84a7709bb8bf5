"""The measuring instrument's own behaviour (never the figures it measures): the bench's Envoy
config adds the echo route and nothing else, wrk's report and latency dump are read right, the
settings are checked, and the soak's pacing aims at its target."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import wrk
from bench.echo_server import SERVICE_NAME as ECHO_SERVICE
from bench.gateway import (
    ECHO_CLUSTER,
    ECHO_PATH,
    ECHO_RPC,
    RATE_LIMIT_FILTER,
    add_echo,
)
from bench.settings import SECTIONS, SettingError, sections
from bench.soak_traffic import Pacer
from services.gateway.render import envoy_binary
from tests.bench.conftest import ECHO_ADDR
from tests.gateway.harness import hcm


def _without_echo(node: Any) -> Any:
    """`node` with the echo service dropped from every transcoder's service list."""
    if isinstance(node, dict):
        return {
            key: [s for s in value if s != ECHO_SERVICE]
            if key == "services"
            else _without_echo(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_without_echo(value) for value in node]
    return node


def test_the_echo_route_is_added_and_nothing_else_changes(rendered: dict[str, Any]) -> None:
    before = copy.deepcopy(rendered)
    config = add_echo(rendered, ECHO_ADDR)
    assert rendered == before  # the mesh's config itself is untouched
    transcoders = [
        f["typed_config"] for f in hcm(config)["http_filters"] if "transcoder" in f["name"]
    ]
    assert ECHO_SERVICE in transcoders[0]["services"]
    routes = hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0] == {
        "match": {
            "path": ECHO_RPC,
            "headers": [{"name": "x-envoy-original-path", "present_match": True}],
        },
        "route": {"cluster": ECHO_CLUSTER, "timeout": "30s"},
    }
    echo_markers = [r for r in routes if r["match"].get("prefix") == ECHO_PATH]
    assert len(echo_markers) == 2
    for marker in echo_markers:
        assert marker["typed_per_filter_config"][RATE_LIMIT_FILTER]["disabled"] is True
    # Take the additions away: what is left is the mesh's config, in the same order.
    routes[:] = [r for r in routes[1:] if r not in echo_markers]
    clusters = config["static_resources"]["clusters"]
    assert clusters[-1]["name"] == ECHO_CLUSTER
    del clusters[-1]
    assert _without_echo(config) == before


def test_envoy_accepts_the_bench_config(rendered: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "envoy-bench.yaml"
    path.write_text(json.dumps(add_echo(rendered, ECHO_ADDR)))
    done = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_wrk_report_and_latency_dump_are_read() -> None:
    output = """Running 8s test @ http://127.0.0.1:1/api/echo
  Latency Distribution
     50%  612.00us
     99%    1.50ms
  40000 requests in 8.00s, 9.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:   5000.00
GENMESH_LATENCY 50 612
GENMESH_LATENCY 99.9 2500
"""
    result = wrk.parse(output)
    assert (result.requests, result.rps, result.non_2xx) == (40000, 5000.0, 3)
    assert result.p50_ms == pytest.approx(0.612)
    assert result.distribution_ms == {"50": 0.612, "99.9": 2.5}
    assert "function done" in wrk.latency_dump()
    assert "return 12" in wrk.paced(12.4)


def test_sections_are_checked() -> None:
    assert sections(None) == SECTIONS
    assert sections("all") == SECTIONS
    assert sections(" events , ceiling") == ("ceiling", "events")
    with pytest.raises(SettingError, match="nope"):
        sections("ceiling,nope")


def test_the_pacer_aims_at_its_target() -> None:
    pacer = Pacer(connections=10, target=100)
    assert pacer.delay_ms == pytest.approx(100)  # 10 connections x 10/s each
    # 80/s reached with 100 ms of delay: each request took 25 ms itself.
    pacer.observe(achieved=80, delay_used_ms=100)
    assert pacer.latency_ms == pytest.approx(25)
    assert pacer.delay_ms == pytest.approx(75)
