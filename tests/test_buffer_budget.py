"""Buffered (non-streamed) answers share one memory budget per process (issue 8.10): past it a call is
refused with a clear 503 and charged nothing, and what it held is given back."""

from __future__ import annotations

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from support.harness import chat_body, start_sidecar, stop_sidecar

BUDGET_BYTES = 100_000


async def _sized_provider() -> TestServer:
    async def chat(request: web.Request) -> web.Response:
        size = int(request.headers.get("x-mock-chunks", "1"))  # forwarded: answer about this many bytes
        body = {
            "id": "c",
            "object": "chat.completion",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * size}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = TestServer(app)
    await server.start_server()
    return server


async def test_an_answer_past_the_budget_is_refused_and_releases_its_bytes(
    redis_client, redis_url, migrated_database_url
) -> None:
    provider = await _sized_provider()
    sc = await start_sidecar(
        redis_url,
        migrated_database_url,
        provider_url=str(provider.make_url("/v1")),
        upstream={"buffered_answers_bytes_max": BUDGET_BYTES},
    )
    try:
        ws = await sc.workspace(credits_micro=1_000_000)
        code, _, body = await sc.chat(ws, chat_body("big"), headers={"x-mock-chunks": str(BUDGET_BYTES * 2)})
        assert code == 503, body
        assert b"buffering too many large answers" in body
        assert sc.svc.buffer_budget.in_use_bytes == 0, "the refused call gave its bytes back"
        code, headers, body = await sc.chat(ws, chat_body("small"), headers={"x-mock-chunks": "100"})
        assert code == 200, body
        assert sc.svc.buffer_budget.in_use_bytes == 0
        identity = await sc.assert_identity(ws.id)
        assert identity["debits"] == int(headers["x-sidecar-cost-micro"]), "only the served call is charged"
        assert sorted(r["status"] for r in await sc.ledger(ws.id)) == ["completed", "failed"]
    finally:
        await stop_sidecar(sc)
        await provider.close()
