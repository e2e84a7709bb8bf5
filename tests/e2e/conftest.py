"""The whole mesh as `make run` starts it (simulator, quota, telemetry, generation, Envoy),
on free ports, against this run's database and Redis prefix, exporting traces to an
in-test OTLP collector."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import jwt
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from devstack.infra import free_port
from devstack.limits import raised_limits_env
from devstack.mesh import Mesh, MeshConfig

JWT_SECRET = "e2e-test-secret-that-is-long-enough-for-hs256"
# A Supabase project URL: tokens must carry iss = <url>/auth/v1 and aud = authenticated.
SUPABASE_URL = "http://127.0.0.1:54321"
JWT_ISSUER = f"{SUPABASE_URL}/auth/v1"
ADMIN_TOKEN = "e2e-admin-token"
FREE_DAILY_LIMIT = 3


class SpanCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """A minimal OTLP/gRPC trace receiver that keeps (service, trace id, span name)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append((service, span.trace_id.hex(), span.name))
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for_spans(
        self, trace_id: str, wanted: set[tuple[str, str]], timeout: float = 20
    ) -> set[tuple[str, str]]:
        """(service, span name) pairs of the trace, once `wanted` are all in or at timeout."""
        deadline = time.monotonic() + timeout
        seen: set[tuple[str, str]] = set()
        while time.monotonic() < deadline:
            with self.lock:
                seen = {(s, n) for s, t, n in self.spans if t == trace_id}
            if wanted <= seen:
                break
            time.sleep(0.2)
        return seen


@pytest.fixture(scope="session")
def span_collector() -> Iterator[tuple[SpanCollector, str]]:
    collector = SpanCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        collector, server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collector, f"http://127.0.0.1:{port}"
    server.stop(grace=None)


@dataclass(frozen=True)
class RunningMesh:
    config: MeshConfig
    collector: SpanCollector

    @property
    def url(self) -> str:
        return self.config.gateway_url


# All e2e traffic comes from 127.0.0.1, one client network: the main mesh raises every rate
# limit out of the way (tests/e2e/test_rate_limits.py runs a mesh with tight ones).
UNLIMITED = raised_limits_env("1000000/minute")


def mesh_config(
    database_url: str, redis_url: str, redis_prefix: str, log_dir: Path, **env: str
) -> MeshConfig:
    """The whole mesh on free ports, against this run's database and Redis prefix."""
    return MeshConfig(
        database_url=database_url,
        redis_url=redis_url,
        redis_key_prefix=redis_prefix,
        generation_addr=f"127.0.0.1:{free_port()}",
        quota_addr=f"127.0.0.1:{free_port()}",
        telemetry_addr=f"127.0.0.1:{free_port()}",
        gateway_port=free_port(),
        gateway_admin_port=free_port(),
        gateway_ops_port=free_port(),
        simulator_port=free_port(),
        metrics_ports={"generation": 0, "quota": 0, "telemetry": 0},
        log_dir=log_dir,
        extra_env={
            "SUPABASE_JWT_SECRET": JWT_SECRET,
            "SUPABASE_URL": SUPABASE_URL,
            "GENMESH_ADMIN_TOKEN": ADMIN_TOKEN,
            "HEALTH_PROBE_INTERVAL_SECONDS": "1",
            "STATS_PUBLISH_INTERVAL_SECONDS": "1",
            "LOG_LEVEL": "INFO",
            # The database is shared with the quota tests, which age reservation rows on
            # purpose and count what their own sweeps expire and prune: a mesh's sweeper
            # must not take those rows first (a test that needs a short TTL sets its own).
            "QUOTA_RESERVATION_TTL_SECONDS": str(30 * 86400),
            "QUOTA_SETTLED_RETENTION_SECONDS": str(400 * 86400),
            **env,
        },
    )


@contextmanager
def running_mesh(
    config: MeshConfig, collector: SpanCollector | None = None
) -> Iterator[RunningMesh]:
    """The mesh `config` describes, started, and stopped (every process) on the way out."""
    mesh = Mesh(config)
    mesh.start()
    try:
        yield RunningMesh(config, collector or SpanCollector())
    finally:
        mesh.stop()


@pytest.fixture(scope="session")
def mesh(
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    span_collector: tuple[SpanCollector, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningMesh]:
    collector, otlp_endpoint = span_collector
    config = mesh_config(
        database_url,
        redis_url,
        redis_prefix,
        tmp_path_factory.mktemp("mesh-logs"),
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
        # All e2e traffic comes from 127.0.0.1: give guests room, and test exhaustion
        # with signed-in users, whose limit is small.
        GUEST_DAILY_LIMIT="100000",
        FREE_DAILY_LIMIT=str(FREE_DAILY_LIMIT),
        **UNLIMITED,
    )
    with running_mesh(config, collector) as running:
        yield running


@pytest.fixture(scope="session")
def http(mesh: RunningMesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mesh.url, timeout=30) as client:
        yield client


def token_for(user_id: str, email: str = "", **claims: object) -> str:
    payload: dict[str, object] = {
        "sub": user_id,
        "role": "authenticated",
        "aud": "authenticated",
        "iss": JWT_ISSUER,
        "exp": int(time.time()) + 600,
        **claims,
    }
    if email:
        payload["email"] = email
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")
