"""Which key a call goes upstream with: the customer's own (BYOK) or the platform's.

DESIGN.md section 9: matching is by provider; the office's key overrides the workspace's. The
customer's key is decrypted in memory for this call only. A customer key the provider refuses
(before any byte reached the client) sends the call back through the platform key, on credits,
and the key is skipped for a cool-down.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.byok.keys import StoredKey
from sidecar.byok.vault import VaultError, binding
from sidecar.config import ProviderConfig
from sidecar.db import POSTGRES_ERRORS
from sidecar.protocols.errors import SidecarError
from sidecar.proxy.call import Call
from sidecar.services import Services

# Provider answers that mean "this customer key cannot pay for this call", not "the call is wrong".
BYOK_REFUSAL_STATUSES = frozenset({401, 402, 403, 429})


@dataclass(frozen=True, slots=True)
class Credential:
    key: str | None  # the customer's key in plaintext, for this call only; None: the platform key
    stored: StoredKey | None

    def __repr__(self) -> str:  # never the key
        return f"Credential(byok={self.stored is not None})"


PLATFORM = Credential(None, None)


async def choose(svc: Services, call: Call, provider: ProviderConfig) -> Credential:
    caller = call.caller
    try:
        stored = await svc.byok.resolve(caller.workspace_id, caller.office_id, provider.name)
    except POSTGRES_ERRORS:
        # Not the platform key instead: a customer who brought a key must not be billed credits for
        # our outage. Refuse, in the protocol's envelope.
        raise SidecarError("unavailable", "the key store is unavailable; retry shortly") from None
    if stored is None:
        return PLATFORM
    if stored.failing:
        call.byok_fallback_reason = f"customer key …{stored.last4} cooling down: {stored.failure_reason}"
        return PLATFORM
    if svc.vault is None:
        raise SidecarError("unavailable", "a customer key is stored but no key-encryption key is configured")
    try:
        plaintext = svc.vault.open(stored.sealed, binding(stored.workspace_id, stored.office_id, provider.name))
    except VaultError as exc:
        # Fail closed: an altered or misplaced ciphertext must never turn into some other key's call.
        raise SidecarError(
            "internal", f"the workspace's stored {provider.name} key cannot be used: {exc}", code="byok_key_unusable"
        ) from None
    return Credential(plaintext, stored)


def refusal(status: int, body: bytes) -> str | None:
    """Why the provider refused the customer's key, or None if the answer is about the call."""
    if status in (401, 403):
        return f"rejected by the provider (HTTP {status})"
    if status == 402:
        return "the customer's provider account is out of credit (HTTP 402)"
    if status == 429 and (b"insufficient_quota" in body or b"billing" in body):
        return "the customer's provider quota is exhausted (HTTP 429)"
    return None
