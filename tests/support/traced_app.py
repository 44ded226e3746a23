"""An aiohttp app instrumented with the OpenTelemetry Python SDK: the application behind Envoy in e2e tests.

Run as ``python -m tests.support.traced_app --port P --otlp-endpoint host:port`` (from the project root);
prints ``ready`` on stdout once listening, like the lab backend, so ``EnvoyLab(backend_command=...)`` can
start it. Spans go over OTLP/gRPC (plaintext) to the endpoint, resource ``service.name`` = ``traced-app``.

Every request gets a SERVER span ``<METHOD> <path>`` whose parent is extracted from the request's W3C
``traceparent`` (a root when there is none), with one INTERNAL child ``app.work``. The SERVER span also
records what the app received (``app.received.traceparent``, ``app.received.b3``,
``http.request.header.x-request-id``), so a test can see which trace context Envoy forwarded.

Routes: ``GET /hello`` -> ``hello from traced app\\n``; anything else 404 (still traced).
SIGTERM/SIGINT: stop serving, then flush and shut the tracer provider down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable

from aiohttp import web
from opentelemetry import propagate
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from otel_envoy.lab.backend import serve

SERVICE_NAME = "traced-app"
HELLO = "hello from traced app\n"
#: request headers copied onto the SERVER span (attribute name -> header)
_RECEIVED = {"app.received.traceparent": "traceparent", "app.received.b3": "b3",
             "app.received.x-b3-traceid": "x-b3-traceid"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_provider(endpoint: str, schedule_delay_ms: int = 100) -> TracerProvider:
    """A tracer provider exporting over OTLP/gRPC (insecure) to ``endpoint`` in small, quick batches."""
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True),
                                                   schedule_delay_millis=schedule_delay_ms))
    return provider


def make_app(provider: TracerProvider) -> web.Application:
    """The app: the tracing middleware and its routes."""
    tracer = provider.get_tracer("tests.support.traced_app")

    @web.middleware
    async def tracing(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = propagate.extract(request.headers)
        attrs: dict[str, str | int] = {
            "http.request.method": request.method,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "server.port": request.url.port or 0,
        }
        for attr, header in _RECEIVED.items():
            if header in request.headers:
                attrs[attr] = request.headers[header]
        if "x-request-id" in request.headers:
            attrs["http.request.header.x-request-id"] = request.headers["x-request-id"]
        with tracer.start_as_current_span(f"{request.method} {request.path}", context=ctx,
                                          kind=SpanKind.SERVER, attributes=attrs) as span:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                span.set_attribute("http.response.status_code", exc.status)
                raise
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    async def hello(_request: web.Request) -> web.Response:
        with tracer.start_as_current_span("app.work", kind=SpanKind.INTERNAL) as span:
            span.set_attribute("app.greeting", "hello")
            await asyncio.sleep(0.002)
        return web.Response(text=HELLO)

    app = web.Application(middlewares=[tracing])
    app.add_routes([web.get("/hello", hello)])
    return app


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(prog="python -m tests.support.traced_app",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--otlp-endpoint", required=True, help="OTLP/gRPC collector, host:port or http://host:port")
    ap.add_argument("--schedule-delay-ms", type=int, default=100)
    args = ap.parse_args(argv)
    propagate.set_global_textmap(TraceContextTextMapPropagator())  # W3C traceparent, whatever the env says
    provider = make_provider(args.otlp_endpoint, args.schedule_delay_ms)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.host, args.port, make_app(provider), "traced-app"))
    finally:
        provider.shutdown()  # exports what is left
    return 0


if __name__ == "__main__":
    sys.exit(main())
