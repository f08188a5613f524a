"""A real OTLP/gRPC trace receiver on loopback, for the tracing tests: a grpcio server
implementing the collector's TraceService from opentelemetry-proto (the service a collector
serves on 4317), decoding each export as tests/otlp_receiver.py's HTTP one does."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)

from .otlp_receiver import SpanStore


class OtlpGrpcReceiver(SpanStore):
    def __init__(self) -> None:
        super().__init__()
        receiver = self

        class Servicer(TraceServiceServicer):  # type: ignore[misc]  # generated code, untyped
            def Export(  # noqa: N802 (the service's method name)
                self, request: ExportTraceServiceRequest, context: Any
            ) -> ExportTraceServiceResponse:
                receiver._arrived()
                receiver._add(request)
                return ExportTraceServiceResponse()

        # A few threads: the API's and each worker's exporter may send at the same time.
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")  # 0: a free port, bound now

    @property
    def endpoint(self) -> str:
        """OTEL_EXPORTER_OTLP_ENDPOINT for the gRPC exporter: http:// for a plaintext channel."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OtlpGrpcReceiver:
        self.server.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.stop(grace=None).wait()
