"""The baseline: a minimal aiohttp reverse proxy with no metering, to price "being a Python proxy".

POST /v1/chat/completions goes to the upstream over one pooled keep-alive ClientSession; a streamed
answer is relayed chunk by chunk as it arrives, anything else is read whole and sent back. No auth,
no parsing, no accounting: whatever the sidecar costs beyond this is the cost of metering.

`python -m bench.passthrough --port P --upstream http://127.0.0.1:M/v1` prints its URL once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
from aiohttp import web

UPSTREAM_KEY = "sk-bench-upstream"
FORWARDED = ("x-mock-chunks", "x-mock-delay-ms")
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {UPSTREAM_KEY}"}
    for name in FORWARDED:
        value = request.headers.get(name)
        if value is not None:
            headers[name] = value
    session = request.app[SESSION]
    async with session.post(request.app[UPSTREAM] + "/chat/completions", data=body, headers=headers) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not content_type.startswith("text/event-stream"):
            data = await upstream.read()
            return web.Response(status=upstream.status, body=data, headers={"Content-Type": content_type})
        response = web.StreamResponse(
            status=upstream.status, headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _on_startup(app: web.Application) -> None:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    app[SESSION] = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


async def _on_cleanup(app: web.Application) -> None:
    await app[SESSION].close()


def build_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app.on_startup.append(_on_startup)
    app.on_cleanup.append(_on_cleanup)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


async def serve(host: str, port: int, upstream: str) -> None:
    runner = web.AppRunner(build_app(upstream), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
        print(f"passthrough listening on http://{host}:{port}/v1", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.passthrough")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8900/v1")
    args = parser.parse_args(argv)
    import uvloop

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args.host, args.port, args.upstream))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
