"""Upstream sessions: one pooled, keep-alive aiohttp client session per provider.

Client headers are not forwarded wholesale: only a short allow-list crosses, so client credentials,
cookies and hop-by-hop headers never leave the sidecar. The platform key is injected here.

Redirects are never followed: a provider answering 3xx would get the prompt re-posted, with the
key (aiohttp strips only `Authorization` across hosts, not `x-api-key`), wherever it points. Every
session refuses a 3xx with RedirectRefused, a ClientError, so callers treat it as the provider's
failure (the call falls back or fails unbilled; a key being validated is not stored).
"""

from __future__ import annotations

import logging
import os

import aiohttp

from sidecar import scrub
from sidecar.config import Config, ProviderConfig
from sidecar.errors import DomainError

log = logging.getLogger("sidecar.upstream")

# traceparent/tracestate: the caller's W3C trace context (observability/tracing.py replaces them with the
# upstream attempt's own when tracing is on).
FORWARDED_HEADERS = (
    "accept",
    "user-agent",
    "openai-beta",
    "x-stainless-lang",
    "x-stainless-package-version",
    "traceparent",
    "tracestate",
)
ANTHROPIC_HEADERS = ("anthropic-beta",)
ANTHROPIC_VERSION = "2023-06-01"
OPENROUTER_HEADERS = ("http-referer", "x-title")


class RedirectRefused(DomainError, aiohttp.ClientError):
    """The provider answered a redirect; it is not followed."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the provider answered HTTP {status} (a redirect); redirects are never followed")
        self.status = status


async def refuse_redirects(request: aiohttp.ClientRequest, handler) -> aiohttp.ClientResponse:
    """A client middleware: runs for every hop, so it stops a redirect before aiohttp follows it."""
    response = await handler(request)
    if 300 <= response.status < 400:
        response.close()
        raise RedirectRefused(response.status)
    return response


class Upstreams:
    def __init__(self, config: Config, env: dict[str, str] | None = None) -> None:
        self.config = config
        env = dict(os.environ) if env is None else env
        self._keys: dict[str, str | None] = {
            name: (env.get(p.api_key_env) if p.api_key_env else None) for name, p in config.providers.items()
        }
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        for key in self._keys.values():
            scrub.remember(key)  # a platform key never reaches a log line
        # Compiled once per provider: the hot path scrubs every answer of the platform's key.
        self._scrubbers = {name: scrub.Scrubber((key,)) for name, key in self._keys.items()}
        self._forwarded = {name: _forwarded_headers(p) for name, p in config.providers.items()}

    async def start(self) -> None:
        timeouts = self.config.upstream
        for name in self.config.providers:
            connector = aiohttp.TCPConnector(
                limit=timeouts.pool_connections_max, keepalive_timeout=30, enable_cleanup_closed=True, ttl_dns_cache=300
            )
            self._sessions[name] = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=timeouts.connect_timeout_ms / 1000,
                    sock_read=timeouts.idle_timeout_ms / 1000,
                ),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
                middlewares=(refuse_redirects,),
            )
            if self.config.providers[name].api_key_env and not self._keys[name]:
                log.warning(
                    "platform key for provider is not set; its calls will be refused",
                    extra={"provider": name, "error": f"${self.config.providers[name].api_key_env} is empty"},
                )

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

    def session(self, provider: str) -> aiohttp.ClientSession:
        return self._sessions[provider]

    def scrubber(self, provider: str, customer_key: str | None) -> scrub.Scrubber:
        """What redacts the credentials a call to `provider` sends from everything it relays or stores.
        A customer's key is compiled per call, never cached: its plaintext lives only for the call."""
        if customer_key is None:
            return self._scrubbers[provider]
        return scrub.Scrubber((self._keys[provider], customer_key))

    def has_credentials(self, provider: str) -> bool:
        return not self.config.providers[provider].api_key_env or bool(self._keys[provider])

    def headers(self, provider: ProviderConfig, client_headers, key: str | None = None) -> dict[str, str]:
        """`key`: the customer's own key for this call (BYOK); None sends the platform key."""
        out = {name: client_headers[name] for name in self._forwarded[provider.name] if name in client_headers}
        out["Content-Type"] = "application/json"
        key = key or self._keys[provider.name]
        if provider.protocol == "anthropic":
            out["anthropic-version"] = client_headers.get("anthropic-version") or ANTHROPIC_VERSION
            if key:
                out["x-api-key"] = key
        elif key:
            out["Authorization"] = f"Bearer {key}"
        return out


def _forwarded_headers(provider: ProviderConfig) -> tuple[str, ...]:
    """The client headers a provider is sent (the rest never leave the sidecar)."""
    allowed = FORWARDED_HEADERS + provider.forward_headers
    if provider.protocol == "anthropic":
        allowed += ANTHROPIC_HEADERS
    if provider.openrouter:
        allowed += OPENROUTER_HEADERS
    return allowed
