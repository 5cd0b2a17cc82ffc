"""Console sessions in Postgres: opened with an admin token, ended by log-out or expiry.

The cookie holds a 256-bit random id; the table holds its SHA-256 (so reading the table opens nothing),
the digest naming the admin token (config `admin_tokens`), a CSRF token, and the expiry. Each token keeps
at most `sessions_per_token_max` sessions: opening one more ends its oldest.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import asyncpg

EXPIRED_PRUNED_MAX = 1_000  # expired rows deleted per log-in: the cleanup is bounded, and keeps up


@dataclass(frozen=True, slots=True)
class Session:
    token_sha256: bytes
    csrf_token: str


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


async def open_session(
    conn: asyncpg.Connection, token_sha256: bytes, ttl_ms: int, per_token_max: int
) -> tuple[str, str]:
    """A new session for the token: (session id for the cookie, CSRF token)."""
    session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    async with conn.transaction():
        await conn.execute(
            "DELETE FROM console_sessions WHERE id_sha256 IN "
            "(SELECT id_sha256 FROM console_sessions WHERE expires_at < now() LIMIT $1)",
            EXPIRED_PRUNED_MAX,
        )
        await conn.execute(
            "DELETE FROM console_sessions WHERE id_sha256 IN (SELECT id_sha256 FROM console_sessions "
            "WHERE token_sha256 = $1 ORDER BY created_at DESC, id_sha256 OFFSET $2)",
            token_sha256,
            per_token_max - 1,
        )
        await conn.execute(
            "INSERT INTO console_sessions (id_sha256, token_sha256, csrf_token, expires_at) "
            "VALUES ($1, $2, $3, now() + make_interval(secs => $4::double precision / 1000))",
            _digest(session_id),
            token_sha256,
            csrf,
            ttl_ms,
        )
    return session_id, csrf


async def find(conn: asyncpg.Connection, session_id: str) -> Session | None:
    """The live session with this id, or None (unknown, ended or expired)."""
    row = await conn.fetchrow(
        "SELECT token_sha256, csrf_token FROM console_sessions WHERE id_sha256 = $1 AND expires_at > now()",
        _digest(session_id),
    )
    return Session(row["token_sha256"], row["csrf_token"]) if row else None


async def close(conn: asyncpg.Connection, session_id: str) -> None:
    await conn.execute("DELETE FROM console_sessions WHERE id_sha256 = $1", _digest(session_id))
