"""Checking a customer's key with its provider before storing it (PROVIDERS.md, "Validating a key
cheaply"): one authenticated read that costs nothing."""

from __future__ import annotations

import asyncio

import aiohttp

from sidecar.config import ProviderConfig
from sidecar.errors import DomainError
from sidecar.proxy.upstream import ANTHROPIC_VERSION


class KeyRejected(DomainError):
    """The provider refused the key."""


class ValidationUnavailable(DomainError):
    """The provider could not be asked (down, slow, unexpected answer): nothing is stored."""


def validation_request(provider: ProviderConfig, key: str) -> tuple[str, dict[str, str]]:
    if provider.openrouter:
        return provider.base_url + "/key", {"Authorization": f"Bearer {key}"}
    if provider.protocol == "anthropic":
        return provider.base_url + "/models", {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}
    return provider.base_url + "/models", {"Authorization": f"Bearer {key}"}


async def validate(session: aiohttp.ClientSession, provider: ProviderConfig, key: str, timeout_ms: int) -> None:
    url, headers = validation_request(provider, key)
    try:
        async with (
            asyncio.timeout(timeout_ms / 1000),
            session.get(url, headers=headers, allow_redirects=False) as response,
        ):
            status = response.status
            await response.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise ValidationUnavailable(
            f"could not reach {provider.name} to validate the key ({type(exc).__name__})"
        ) from None
    if status in (401, 403):
        raise KeyRejected(f"{provider.name} rejected this key (HTTP {status}); nothing was stored")
    if status >= 300:  # a redirect is never followed: the key would go wherever it points
        raise ValidationUnavailable(f"{provider.name} answered HTTP {status} while validating; nothing was stored")
