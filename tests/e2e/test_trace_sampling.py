"""Clients cannot steer tracing: a `traceparent` sent to the public gateway, sampled flag and
all, does not make the services record or export anything. genmesh's own sampler decides
(here it samples nothing: parentbased_traceidratio at 0), and internal callers, which reach
the services directly, still propagate their context."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator

import grpc
import httpx
import pytest

from genmesh.generation.v1 import generation_pb2, generation_pb2_grpc
from tests.e2e.conftest import (
    UNLIMITED,
    RunningMesh,
    SpanCollector,
    mesh_config,
    running_mesh,
    token_for,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def unsampled_mesh(
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
        f"{redis_prefix}sampling:",
        tmp_path_factory.mktemp("sampling-mesh-logs"),
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
        # Root spans are never sampled; a sampled parent still is (parent-based).
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0",
        GUEST_DAILY_LIMIT="100000",
        **UNLIMITED,
    )
    with running_mesh(config, collector) as running:
        yield running


def spans_of(collector: SpanCollector, trace_id: str) -> set[tuple[str, str]]:
    with collector.lock:
        return {(s, n) for s, t, n in collector.spans if t == trace_id}


def test_a_clients_sampled_traceparent_exports_nothing(unsampled_mesh: RunningMesh) -> None:
    trace_ids = [secrets.token_hex(16) for _ in range(3)]
    with httpx.Client(base_url=unsampled_mesh.url, timeout=30) as http:
        for trace_id in trace_ids:
            r = http.post(
                "/api/generate",
                json={"text": f"steer me {uuid.uuid4()}"},
                headers={
                    "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
                    "authorization": f"Bearer {token_for('steerer')}",
                },
            )
            assert r.status_code == 200, r.text
    # A positive control in the same run: an internal caller's sampled context is honoured,
    # so the exporter works and a client's spans would have arrived by the time these do.
    internal = secrets.token_hex(16)
    channel = grpc.insecure_channel(unsampled_mesh.config.generation_addr)
    with channel:
        generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            generation_pb2.GenerateRequest(text=f"internal {uuid.uuid4()}"),
            metadata=(("traceparent", f"00-{internal}-{secrets.token_hex(8)}-01"),),
            timeout=30,
        )
    wanted = {("generation", "/genmesh.generation.v1.GenerationService/Generate")}
    assert wanted <= unsampled_mesh.collector.wait_for_spans(internal, wanted)
    time.sleep(0.5)  # the batch processor exports every 100 ms
    for trace_id in trace_ids:
        assert spans_of(unsampled_mesh.collector, trace_id) == set()
