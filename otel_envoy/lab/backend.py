"""The lab's upstream: a tiny aiohttp server.

Run as ``python -m otel_envoy.lab.backend --port N``; prints ``ready`` on stdout once listening.

Routes: ``GET /`` -> ``hello from backend\\n``; ``GET /bytes/{n}`` -> n bytes; ``GET /status/{code}`` -> that
status; ``GET /delay/{ms}`` -> ``ok`` after ms milliseconds; ``GET /chunked/{count}/{size}`` -> a chunked
body of count chunks of size bytes, 5 ms apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from aiohttp import web

MAX_BYTES = 64 * 1024 * 1024
MAX_DELAY_MS = 60_000
HELLO = "hello from backend\n"


async def _hello(_request: web.Request) -> web.Response:
    return web.Response(text=HELLO)


def _int_param(request: web.Request, name: str, lo: int, hi: int) -> int:
    try:
        value = int(request.match_info[name])
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer\n") from None
    if not lo <= value <= hi:
        raise web.HTTPBadRequest(text=f"{name} must be in [{lo}, {hi}]\n")
    return value


async def _bytes(request: web.Request) -> web.Response:
    n = _int_param(request, "n", 0, MAX_BYTES)
    return web.Response(body=b"x" * n, content_type="application/octet-stream")


async def _status(request: web.Request) -> web.Response:
    code = _int_param(request, "code", 200, 599)
    if code in (204, 304):
        return web.Response(status=code)
    return web.Response(status=code, text=f"status {code}\n")


async def _chunked(request: web.Request) -> web.StreamResponse:
    """``count`` chunks of ``size`` bytes, sent 5 ms apart (each its own write, chunked encoding)."""
    count = _int_param(request, "count", 0, 1000)
    size = _int_param(request, "size", 1, MAX_BYTES // 1000)
    resp = web.StreamResponse()
    resp.content_type = "application/octet-stream"
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for _ in range(count):
        await resp.write(b"c" * size)
        await asyncio.sleep(0.005)
    await resp.write_eof()
    return resp


async def _delay(request: web.Request) -> web.Response:
    ms = _int_param(request, "ms", 0, MAX_DELAY_MS)
    await asyncio.sleep(ms / 1000)
    return web.Response(text="ok\n")


def make_app() -> web.Application:
    """Build the backend's aiohttp application."""
    app = web.Application()
    app.add_routes(
        [
            web.get("/", _hello),
            web.get("/bytes/{n}", _bytes),
            web.get("/status/{code}", _status),
            web.get("/delay/{ms}", _delay),
            web.get("/chunked/{count}/{size}", _chunked),
        ]
    )
    return app


async def serve(host: str, port: int, app: web.Application | None = None, name: str = "backend") -> None:
    """Serve ``app`` (default: the lab backend) until SIGTERM/SIGINT; print ``ready`` on stdout once
    listening."""
    runner = web.AppRunner(app if app is not None else make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{name}: listening on {runner.addresses}", file=sys.stderr, flush=True)
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(prog="python -m otel_envoy.lab.backend", description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
