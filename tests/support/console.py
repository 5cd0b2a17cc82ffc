"""Signing in to the console over plain HTTP (no browser): a cookie-keeping client and the CSRF token."""

from __future__ import annotations

import re
from dataclasses import dataclass

import aiohttp

from support.harness import Sidecar

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(page: str) -> str:
    found = _CSRF.search(page)
    assert found, "no CSRF field on the page"
    return found.group(1)


@dataclass
class ConsoleClient:
    http: aiohttp.ClientSession
    base: str  # http://127.0.0.1:port
    csrf: str = ""

    async def get(self, path: str) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.get(self.base + path, allow_redirects=False) as resp:
            return resp.status, await resp.text(), resp

    async def post(
        self, path: str, form: dict | None = None, csrf: str | None = None
    ) -> tuple[int, str, aiohttp.ClientResponse]:
        data = {"csrf": self.csrf if csrf is None else csrf, **(form or {})}
        async with self.http.post(self.base + path, data=data, allow_redirects=False) as resp:
            return resp.status, await resp.text(), resp

    async def close(self) -> None:
        await self.http.close()


async def anonymous(sidecar: Sidecar) -> ConsoleClient:
    return ConsoleClient(aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)), _base(sidecar))


async def signed_in(sidecar: Sidecar, token: str) -> ConsoleClient:
    client = await anonymous(sidecar)
    status, page, _ = await client.get("/console/login")
    assert status == 200
    status, _, resp = await client.post("/console/login", {"token": token}, csrf=csrf_of(page))
    assert status == 303, status
    landing = resp.headers["Location"]
    for _ in range(3):  # /console -> the workspace or the workspace list
        status, page, resp = await client.get(landing)
        if status != 303:
            break
        landing = resp.headers["Location"]
    assert status == 200, (landing, status)
    client.csrf = csrf_of(page)
    return client


def _base(sidecar: Sidecar) -> str:
    return str(sidecar.control.make_url("")).rstrip("/")
