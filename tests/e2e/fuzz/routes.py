"""The REST routes to fuzz, read from the descriptor set Envoy transcodes with, so a new route
is fuzzed as soon as it has a `google.api.http` rule (on a service the gateway transcodes: the
bench's echo service is in the set too, but only the bench's own Envoy routes to it)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor

from services.gateway.render import TRANSCODED_SERVICES

DESCRIPTOR_SET = Path(__file__).resolve().parents[3] / "gen" / "genmesh.pb"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    message: Descriptor
    streaming: bool

    @property
    def admin(self) -> bool:
        return self.path.startswith("/api/admin/")


def discover_routes() -> list[Route]:
    """Every method with a `google.api.http` rule in the descriptor set Envoy loads, of the
    services it transcodes."""
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    pool = descriptor_pool.Default()
    routes = []
    for file in files.file:
        if not file.package.startswith("genmesh."):
            continue
        # The generated module registers the messages, with their protovalidate options.
        importlib.import_module(file.name.removesuffix(".proto").replace("/", ".") + "_pb2")
        for service in file.service:
            if f"{file.package}.{service.name}" not in TRANSCODED_SERVICES:
                continue
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rule = method.options.Extensions[annotations_pb2.http]
                verb = str(rule.WhichOneof("pattern"))
                routes.append(
                    Route(
                        method=verb.upper(),
                        path=str(getattr(rule, verb)),
                        message=pool.FindMessageTypeByName(method.input_type.lstrip(".")),
                        streaming=method.server_streaming,
                    )
                )
    return routes
