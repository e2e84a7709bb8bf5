"""A second Envoy gateway beside the mesh's own, and what Envoy's admin API says about rate
limiting.

The second gateway is started by devstack's Mesh exactly as the first (render the config from
the environment, then exec Envoy on it) with the same environment, so the two differ only in
their ports and in the settings the caller overrides (GATEWAY_RATE_LIMIT=false here).
"""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from devstack.infra import free_port
from devstack.mesh import Mesh

RATE_LIMIT_COUNTERS = ("ok", "over_limit", "error", "failure_mode_allowed")


@dataclass(frozen=True)
class Gateway:
    """An Envoy gateway to drive: where it listens, its admin API, and its process id (the
    render process execs Envoy, so the id is Envoy's)."""

    label: str
    url: str
    admin_url: str
    pid: int


def _get(url: str, timeout: float = 2) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - loopback only
        status: int = reply.status
        return status, reply.read().decode()


@contextlib.contextmanager
def extra_gateway(mesh: Mesh, label: str, overrides: Mapping[str, str]) -> Iterator[Gateway]:
    """Another Envoy in front of the mesh's services, on free ports, ready to serve; stopped
    (no process left behind) when the block ends, however it ends."""
    port, admin_port = free_port(), free_port()
    child = mesh.start_gateway(f"envoy-{port}", port, admin_port, overrides)
    try:
        yield Gateway(
            label,
            f"http://{mesh.config.gateway_host}:{port}",
            f"http://127.0.0.1:{admin_port}",
            child.process.pid,
        )
    finally:
        mesh.stop_child(child)


def rate_limit_counters(admin_url: str) -> dict[str, int]:
    """Envoy's rate-limit filter counters, summed over its stat prefixes: `ok` and
    `over_limit` are answers; `error` are checks that failed or timed out, which let the
    request through (`failure_mode_allowed`) unless the gateway fails closed."""
    _, text = _get(f"{admin_url}/stats?filter=%5C.ratelimit%5C.")
    counters = dict.fromkeys(RATE_LIMIT_COUNTERS, 0)
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        kind = name.rsplit(".", 1)[-1]
        if ".ratelimit." in name and kind in counters and value.strip().isdigit():
            counters[kind] += int(value)
    return counters
