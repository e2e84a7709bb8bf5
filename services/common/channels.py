"""Long-lived gRPC channels from one service to another."""

from __future__ import annotations

import json

import grpc

from services.common.server import LIVENESS_SERVICE

# Keepalive pings find a dead peer (e.g. a pod gone without a FIN) in ~40 s instead of at the
# next call's deadline; the mesh's servers accept pings every 10 s. round_robin spreads calls
# over every address the name resolves to (a headless Kubernetes Service); with one address it
# changes nothing. Client-side health checking (grpc.health.v1 Watch of `liveness`, which a
# replica reports NOT_SERVING only once it is stopping) takes a stopping replica out of the
# rotation at once, while it still serves (SHUTDOWN_DRAIN_DELAY_SECONDS): without it the
# channel keeps sending until the server refuses, and a call that arrives in that instant
# fails with CANCELLED. A server without grpc.health.v1 counts as healthy.
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    (
        "grpc.service_config",
        json.dumps(
            {
                "loadBalancingConfig": [{"round_robin": {}}],
                "healthCheckConfig": {"serviceName": LIVENESS_SERVICE},
            }
        ),
    ),
]


def internal_channel(address: str) -> grpc.aio.Channel:
    """A channel to another genmesh service at `host:port` (plaintext: inside the mesh)."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
