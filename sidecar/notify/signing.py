"""The signature of an outgoing webhook, the way Stripe signs its own (pure: no I/O).

Header: `Sidecar-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`. The
timestamp is inside the signed bytes, so a receiver that checks it is recent (`TOLERANCE_S`) cannot
be replayed an old delivery. A receiver verifies it as `verify` does: take `t` and every `v1`, compute
the HMAC over the exact body bytes received, compare in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sidecar.errors import DomainError

HEADER = "Sidecar-Signature"
EVENT_ID_HEADER = "Sidecar-Event-Id"
EVENT_TYPE_HEADER = "Sidecar-Event-Type"
SCHEME = "v1"
TOLERANCE_S = 300
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
HEADER_CHARS_MAX = 4096


class SignatureInvalid(DomainError):
    """A webhook signature that does not verify (malformed, stale, or not made with this secret)."""


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The header value for `body` sent at `timestamp` (unix seconds)."""
    return f"t={timestamp},{SCHEME}={_digest(secret, timestamp, body)}"


def verify(secret: str, body: bytes, header: str, now: int, tolerance_s: int = TOLERANCE_S) -> int:
    """What a receiver does; returns the signed timestamp. SignatureInvalid otherwise."""
    if len(header) > HEADER_CHARS_MAX:
        raise SignatureInvalid("signature header too long")
    timestamp, candidates = None, []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == SCHEME:
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureInvalid("signature header lacks t= or v1=")
    if abs(now - timestamp) > tolerance_s:
        raise SignatureInvalid("signature timestamp outside the tolerance")
    expected = _digest(secret, timestamp, body)
    if not any(hmac.compare_digest(expected, c) for c in candidates):
        raise SignatureInvalid("no signature matches")
    return timestamp
