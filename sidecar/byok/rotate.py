"""`sidecar kek rotate`: re-wrap every stored data key under the newest KEK.

Only data keys are unwrapped and wrapped again, in memory; the customers' keys themselves are never
decrypted, and nothing in plaintext is written anywhere. Each row is replaced compare-and-set, so a
rotation racing another changes nothing stale. Run it with the old and the new KEK configured (the
new one last); once it reports every key re-wrapped, the old KEK can be removed.
"""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

from sidecar.byok import keys
from sidecar.byok.vault import KekMissing, KeyRing, Vault, VaultError, binding
from sidecar.notify import endpoints as notify_endpoints


async def rotate_all(database_url: str, env: Mapping[str, str]) -> tuple[int, int, list[str]]:
    """(re-wrapped, stored, ids that could not be opened). A row that fails authentication is left
    as it is and reported: it was altered, and re-wrapping must not launder it."""
    ring = KeyRing.from_env(env)
    if ring is None:
        raise KekMissing("no key-encryption key is configured: set SIDECAR_KEK or SIDECAR_KEK_FILE")
    vault = Vault(ring)
    conn = await asyncpg.connect(database_url)
    try:
        stored = await keys.all_keys(conn)
        rewrapped, failed = 0, []
        for key in stored:
            if key.kek_id == ring.newest_id:
                continue
            try:
                new = vault.rewrap(key.sealed, binding(key.workspace_id, key.office_id, key.provider))
            except VaultError:
                failed.append(key.id)
                continue
            if await keys.replace_sealed(conn, key.id, key.sealed, new):
                rewrapped += 1
        # Notification endpoints' signing secrets are sealed under the same KEKs.
        sealed_secrets = await notify_endpoints.all_sealed(conn)
        for endpoint in sealed_secrets:
            if endpoint.kek_id == ring.newest_id:
                continue
            try:
                new = vault.rewrap(endpoint.sealed, notify_endpoints.aad(endpoint.workspace_id))
            except VaultError:
                failed.append(f"notification endpoint of {endpoint.workspace_id}")
                continue
            if await notify_endpoints.replace_sealed(conn, endpoint.workspace_id, endpoint.sealed, new):
                rewrapped += 1
        return rewrapped, len(stored) + len(sealed_secrets), failed
    finally:
        await conn.close()
