"""A workspace's notification endpoint: its URL, the event types it takes, and its signing secret.

The secret is generated here, returned once to whoever created it, and stored sealed by the BYOK vault
(AES-256-GCM under its own data key, wrapped by the KEK, bound to the workspace): the database alone
cannot sign a webhook. Only its last 4 characters are shown afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from sidecar.byok.vault import Sealed, Vault, binding
from sidecar.notify.signing import new_secret

# The vault binds a ciphertext to (workspace, office, provider); this "provider" names the use.
BINDING_USE = "notification-endpoint"
_COLUMNS = "workspace_id, url, events, kek_id, wrapped_dek, ciphertext, secret_last4, created_at, updated_at"


@dataclass(frozen=True, slots=True, repr=False)
class Endpoint:
    workspace_id: str
    url: str
    events: list[str]
    kek_id: str
    wrapped_dek: bytes
    ciphertext: bytes
    secret_last4: str
    created_at: datetime
    updated_at: datetime

    @property
    def sealed(self) -> Sealed:
        return Sealed(self.kek_id, self.wrapped_dek, self.ciphertext)

    def view(self) -> dict:
        return {
            "workspace_id": self.workspace_id,
            "url": self.url,
            "events": sorted(self.events),
            "secret_last4": self.secret_last4,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }

    def __repr__(self) -> str:
        return f"Endpoint(workspace_id={self.workspace_id!r}, url=<{len(self.url)} chars>)"


def aad(workspace_id: str) -> bytes:
    return binding(workspace_id, None, BINDING_USE)


async def upsert(
    conn: asyncpg.Connection, vault: Vault, workspace_id: str, url: str, events: list[str], rotate_secret: bool
) -> tuple[Endpoint, str | None]:
    """Create or change the endpoint. A new secret (returned, the only time it is ever seen) when the
    endpoint is new or `rotate_secret`; otherwise the stored one is kept and None is returned."""
    existing = await get(conn, workspace_id)
    if existing is not None and not rotate_secret:
        row = await conn.fetchrow(
            f"UPDATE notification_endpoints SET url = $2, events = $3, updated_at = now() WHERE workspace_id = $1 "
            f"RETURNING {_COLUMNS}",
            workspace_id,
            url,
            events,
        )
        return Endpoint(**row), None
    secret = new_secret()
    sealed = vault.seal(secret, aad(workspace_id))
    row = await conn.fetchrow(
        "INSERT INTO notification_endpoints (workspace_id, url, events, kek_id, wrapped_dek, ciphertext, secret_last4) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (workspace_id) DO UPDATE SET url = EXCLUDED.url, "
        "events = EXCLUDED.events, kek_id = EXCLUDED.kek_id, wrapped_dek = EXCLUDED.wrapped_dek, "
        "ciphertext = EXCLUDED.ciphertext, secret_last4 = EXCLUDED.secret_last4, updated_at = now() "
        f"RETURNING {_COLUMNS}",
        workspace_id,
        url,
        events,
        sealed.kek_id,
        sealed.wrapped_dek,
        sealed.ciphertext,
        secret[-4:],
    )
    return Endpoint(**row), secret


async def get(conn: asyncpg.Connection, workspace_id: str) -> Endpoint | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM notification_endpoints WHERE workspace_id = $1", workspace_id)
    return Endpoint(**row) if row else None


async def delete(conn: asyncpg.Connection, workspace_id: str) -> bool:
    status = await conn.execute("DELETE FROM notification_endpoints WHERE workspace_id = $1", workspace_id)
    return status.endswith(" 1")


async def kek_ids(conn: asyncpg.Connection) -> list[str]:
    return [r["kek_id"] for r in await conn.fetch("SELECT DISTINCT kek_id FROM notification_endpoints")]


async def all_sealed(conn: asyncpg.Connection) -> list[Endpoint]:
    return [Endpoint(**r) for r in await conn.fetch(f"SELECT {_COLUMNS} FROM notification_endpoints")]


async def replace_sealed(conn: asyncpg.Connection, workspace_id: str, old: Sealed, new: Sealed) -> bool:
    """Compare-and-set, for `sidecar kek rotate`."""
    status = await conn.execute(
        "UPDATE notification_endpoints SET kek_id = $2, wrapped_dek = $3 "
        "WHERE workspace_id = $1 AND kek_id = $4 AND wrapped_dek = $5",
        workspace_id,
        new.kek_id,
        new.wrapped_dek,
        old.kek_id,
        old.wrapped_dek,
    )
    return status.endswith(" 1")
