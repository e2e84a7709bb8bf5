"""An OTLP/gRPC trace receiver that counts the spans it receives and keeps none: where the
`tracing` section of `make bench` exports (python -m bench.span_sink PORT). On SIGTERM or
SIGINT it prints the count on stdout and exits."""

from __future__ import annotations

import signal
import sys
import threading
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class SpanSink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        received = sum(
            len(scope.spans) for spans in request.resource_spans for scope in spans.scope_spans
        )
        with self._lock:
            self.spans += received
        return trace_service_pb2.ExportTraceServiceResponse()


def main(port: int) -> None:
    sink = SpanSink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()
    print(sink.spans, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
