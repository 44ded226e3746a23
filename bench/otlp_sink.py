"""An OTLP/gRPC trace receiver for benchmarks: takes every export, decodes none, counts them.

Run by the benchmarks as a process of its own (like a collector next to the daemon, on the same machine):
``python bench/otlp_sink.py STATS_FILE`` prints its port and, after every export, rewrites STATS_FILE with
what it received so far: requests, bytes, and spans named ``GET`` (each counted by its ``Span.name`` field,
tag 5 with length 3, which no other field of a span or resource writes as these 5 bytes). Decoding every
request (as the tests' receiver does) would cost about as much CPU as the daemon's encoding, on the CPUs the
load shares; ``--check`` decodes the last request with the OpenTelemetry protobuf classes when it stops,
so a run still shows that what arrived parses as an ``ExportTraceServiceRequest``.

:class:`OtlpSink` starts and stops it from a benchmark.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
GET_SPAN_NAME = b"\x2a\x03GET"  # Span.name (field 5, length-delimited), length 3, "GET"


class OtlpSink:
    """The receiver process: its endpoint, what it received, and its CPU time."""

    def __init__(self, workdir: Path) -> None:
        self.stats_path = workdir / f"otlp-sink-{time.monotonic_ns()}.json"
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.stats_path), "--check"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"otlp sink did not start: {line!r} {self.proc.communicate()[1]}")
        self.endpoint = f"http://127.0.0.1:{int(line)}"
        self.message = ""  # what it said when it stopped

    def __enter__(self) -> OtlpSink:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()

    def stats(self) -> dict:
        """requests, bytes, get_spans received so far (zeros before the first export)."""
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {"requests": 0, "bytes": 0, "get_spans": 0}

    def cpu(self) -> float:
        """CPU seconds the receiver used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> str:
        """Stop it; returns (and keeps in ``message``) what it said when it stopped: its totals and the
        check of the last request."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.stats_path.unlink(missing_ok=True)
        self.message = err.strip()
        return self.message


def serve(stats_path: Path, check: bool) -> None:
    """Serve until SIGTERM."""
    import grpc

    lock = threading.Lock()
    totals = {"requests": 0, "bytes": 0, "get_spans": 0}
    last: list[bytes] = [b""]

    def export(request: bytes, context: object) -> bytes:
        with lock:
            totals["requests"] += 1
            totals["bytes"] += len(request)
            totals["get_spans"] += request.count(GET_SPAN_NAME)
            last[0] = request
            tmp = stats_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(totals))
            tmp.replace(stats_path)
        return b""  # an empty ExportTraceServiceResponse: everything accepted

    handler = grpc.method_handlers_generic_handler(SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(
        export, request_deserializer=None, response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(0)
    message = f"received {totals}"
    if check and last[0]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        req = ExportTraceServiceRequest.FromString(last[0])
        spans = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        message += f"; the last request decodes: {spans} spans"
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), "--check" in sys.argv[2:])
