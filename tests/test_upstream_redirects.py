"""A provider answering a redirect never gets the prompt or the key re-sent anywhere (issue 8.2):
not on a call, not while validating a customer's key."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from support.harness import PLATFORM_KEY, TENANT_ADMIN_TOKEN, Sidecar, chat_body, start_sidecar, stop_sidecar

CUSTOMER_KEY = "sk-customer-redirected-key-1234"


class Elsewhere:
    """The host a redirect points at: records whatever reaches it."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.record)
        self.server = TestServer(app)

    async def record(self, request: web.Request) -> web.Response:
        self.received.append({"path": request.path, "headers": dict(request.headers), "body": await request.read()})
        return web.json_response({"object": "list", "data": []})


def redirecting_provider(location: str, status: int) -> web.Application:
    async def redirect(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, headers={"Location": location + request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app


@pytest_asyncio.fixture(params=[307, 308, 302, 301])
async def redirected(
    request, redis_client, redis_url, migrated_database_url
) -> AsyncIterator[tuple[Sidecar, Elsewhere]]:
    elsewhere = Elsewhere()
    await elsewhere.server.start_server()
    provider = TestServer(redirecting_provider(str(elsewhere.server.make_url("")).rstrip("/"), request.param))
    await provider.start_server()
    sidecar = await start_sidecar(redis_url, migrated_database_url, provider_url=str(provider.make_url("/v1")))
    try:
        yield sidecar, elsewhere
    finally:
        await stop_sidecar(sidecar)
        await provider.close()
        await elsewhere.server.close()


async def test_a_redirected_call_is_an_upstream_error_and_nothing_is_resent(redirected):
    sidecar, elsewhere = redirected
    ws = await sidecar.workspace(credits_micro=10_000_000)
    status, _, body = await sidecar.chat(ws, chat_body())
    assert status == 502, body
    error = orjson.loads(body)["error"]
    assert error["type"] == "api_error" and error["code"] == "upstream_unavailable"
    assert elsewhere.received == []
    assert PLATFORM_KEY.encode() not in body
    identity = await sidecar.assert_identity(ws.id)
    assert identity["debits"] == 0


async def test_a_key_whose_validation_is_redirected_is_not_sent_on_nor_stored(redirected):
    sidecar, elsewhere = redirected
    ws = await sidecar.workspace()
    status, body = await sidecar.admin(
        "POST", f"/workspaces/{ws.id}/byok-keys", {"provider": "mock", "key": CUSTOMER_KEY}, token=TENANT_ADMIN_TOKEN
    )
    assert status == 502, body
    assert body["error"]["code"] == "validation_unavailable"
    assert elsewhere.received == []
    status, listed = await sidecar.admin("GET", f"/workspaces/{ws.id}/byok-keys", token=TENANT_ADMIN_TOKEN)
    assert status == 200 and listed["data"] == []
