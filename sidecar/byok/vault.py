"""The BYOK vault: AES-256-GCM envelope encryption of customers' provider keys (DESIGN.md §9).

Each stored key gets its own random 32-byte data key (DEK). The secret is encrypted under the DEK, and the
DEK is wrapped (encrypted) under a key-encryption key (KEK) that never reaches the database. What a row
stores is a `Sealed`:

    kek_id       which KEK wrapped the DEK (KEKs are versioned so rotation can be gradual)
    wrapped_dek  nonce (12 bytes) || AES-256-GCM(KEK, DEK, aad)     -- always exactly 60 bytes
    ciphertext   nonce (12 bytes) || AES-256-GCM(DEK, secret, aad)  -- 28 bytes + the secret's UTF-8 length

Both encryptions use the same associated data, `binding(workspace, office, provider)`, so a row copied to
another scope fails authentication at the first step, and rotation (`Vault.rewrap`) re-checks the binding
without ever decrypting the secret.

Secrets and key bytes never appear in exception messages or reprs. Error trackers also record exception
chains and frame locals, so the few places that could fail while holding plaintext raise outside their
`except` block (no chained exception carrying the text) and avoid naming plaintext in the raising frame.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.errors import DomainError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
WRAPPED_DEK_BYTES = NONCE_BYTES + KEY_BYTES + TAG_BYTES

ENV_KEK = "SIDECAR_KEK"
ENV_KEK_FILE = "SIDECAR_KEK_FILE"

_BINDING_PREFIX = b"byok/v1\0"
# 32 characters at most: a 256-bit key needs at least 43 base64 (or 64 hex) characters, so a valid id can
# never be a key pasted into the wrong place, and ids are therefore safe to show in messages.
_KEK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_KEK_ID_RULE = "a KEK id must be 1-32 characters of letters, digits, '.', '_' or '-'"
_KEY_HINT = "generate one with `sidecar kek generate`"
_TAMPERED = "stored key failed authentication: it was altered or belongs to another workspace/office/provider"


class VaultError(DomainError):
    """A vault failure. The message is safe to show and log: it never contains key material or secrets."""


class KekMissing(VaultError):
    """A stored key was wrapped by a KEK this process is not configured with."""


@dataclass(frozen=True, slots=True, repr=False)
class Sealed:
    """What the database stores for one key: ciphertext only (layout in the module docstring)."""

    kek_id: str
    wrapped_dek: bytes
    ciphertext: bytes

    def __repr__(self) -> str:
        # Ciphertext is harmless, but bytes dumps only add noise to logs.
        return (
            f"Sealed(kek_id={self.kek_id!r}, wrapped_dek=<{len(self.wrapped_dek)} bytes>, "
            f"ciphertext=<{len(self.ciphertext)} bytes>)"
        )


def binding(workspace_id: str, office_id: str | None, provider: str) -> bytes:
    """The associated data tying a ciphertext to its row's scope: versioned, and JSON so it is unambiguous."""
    if not (isinstance(workspace_id, str) and isinstance(provider, str) and isinstance(office_id, str | None)):
        raise TypeError("binding() takes str ids (office_id may be None)")
    return _BINDING_PREFIX + orjson.dumps([workspace_id, office_id, provider])


def generate_kek() -> str:
    """A new random KEK as "id:base64" text, ready for SIDECAR_KEK or a line of SIDECAR_KEK_FILE."""
    key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
    return f"{_derive_id(key)}:{base64.b64encode(key).decode('ascii')}"


def check_startup(ring: KeyRing | None, stored_kek_ids: Iterable[str]) -> None:
    """Refuse to start when stored BYOK keys could not be opened (pass the distinct kek_id values stored)."""
    needed = sorted(set(stored_kek_ids))
    if not needed:
        return
    if ring is None:
        raise KekMissing(
            f"BYOK keys are stored (sealed under KEK {', '.join(needed)}) but no key-encryption key is configured: "
            f"set {ENV_KEK} or {ENV_KEK_FILE}"
        )
    missing = [kek_id for kek_id in needed if kek_id not in ring.ids()]
    if missing:
        raise KekMissing(
            f"stored BYOK keys are sealed under KEK {', '.join(missing)}, which is not configured "
            f"(configured: {', '.join(ring.ids())}): add it back to {ENV_KEK} or {ENV_KEK_FILE}; "
            "run `sidecar kek rotate` before removing an old KEK"
        )


# ---------------------------------------------------------------------------------------------------------
# KEK configuration


@dataclass(frozen=True, slots=True)
class _Entry:
    kek_id: str
    key: bytes = field(repr=False)
    where: str  # e.g. "SIDECAR_KEK_FILE line 3", for error messages


def _derive_id(key: bytes) -> str:
    # A short hash of a random 256-bit key reveals nothing useful about it, and it is deterministic, so the
    # same bare key always gets the same id (operators can check it: base64 -d | sha256sum | cut -c1-8).
    return hashlib.sha256(key).hexdigest()[:8]


def _decode_key(text: str, where: str) -> bytes:
    # Accept standard and URL-safe base64, padded or not: operators paste from many tools.
    normalized = text.strip().replace("-", "+").replace("_", "/")
    normalized += "=" * (-len(normalized) % 4)
    try:
        key = base64.b64decode(normalized, validate=True)
    except binascii.Error:
        key = None
    if key is None:
        raise VaultError(f"{where}: the key is not valid base64 ({_KEY_HINT})")
    if len(key) != KEY_BYTES:
        raise VaultError(f"{where}: the key must be {KEY_BYTES} bytes of base64, got {len(key)} bytes ({_KEY_HINT})")
    return key


def _parse_entry(text: str, where: str) -> _Entry:
    kek_id, colon, key_text = text.partition(":")
    kek_id = kek_id.strip()
    if not colon or not key_text.strip():
        raise VaultError(f'{where}: expected "id:base64-key"')
    if not _KEK_ID_RE.fullmatch(kek_id):
        raise VaultError(f"{where}: {_KEK_ID_RULE}")
    return _Entry(kek_id, _decode_key(key_text, where), where)


def _entries_from_env_value(value: str) -> list[_Entry]:
    # A bare key (no ':' or ',') is the simple single-KEK setup; its id is derived from the key.
    if ":" not in value and "," not in value:
        key = _decode_key(value, ENV_KEK)
        return [_Entry(_derive_id(key), key, ENV_KEK)]
    return [_parse_entry(part, f"{ENV_KEK} entry {n}") for n, part in enumerate(value.split(","), start=1)]


def _read_kek_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    except UnicodeDecodeError:
        # Raised below, outside this block: the decode error object holds the file's whole content.
        reason = "not UTF-8 text"
    raise VaultError(f"{ENV_KEK_FILE}: cannot read {path}: {reason}")


def _entries_from_file(path: str) -> list[_Entry]:
    entries = []
    for number, line in enumerate(_read_kek_file(path).splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(_parse_entry(line, f"{ENV_KEK_FILE} line {number}"))
    if not entries:
        # A mounted file with no keys is almost certainly a broken mount, not a wish for no KEK.
        raise VaultError(f"{ENV_KEK_FILE}: {path} contains no keys")
    return entries


def _merge(entries: list[_Entry]) -> list[_Entry]:
    """Drop repeats of the same id and key (keeping the later, newer position); refuse conflicting ids."""
    merged: dict[str, _Entry] = {}
    for entry in entries:
        prior = merged.pop(entry.kek_id, None)
        if prior is not None and not hmac.compare_digest(prior.key, entry.key):
            raise VaultError(f"KEK id {entry.kek_id!r} has two different keys ({prior.where} and {entry.where})")
        merged[entry.kek_id] = entry
    return list(merged.values())


class KeyRing:
    """The KEKs this process knows: id -> 32-byte key; `newest` is the one new data keys are wrapped with."""

    __slots__ = ("_ciphers", "_newest_id")

    def __init__(self, keys: Iterable[tuple[str, bytes]]) -> None:
        """`keys` in order oldest to newest; the last one wraps all new data keys."""
        # Only cipher objects are kept, not the raw key bytes.
        self._ciphers: dict[str, AESGCM] = {}
        for kek_id, key in keys:
            if not isinstance(kek_id, str) or not _KEK_ID_RE.fullmatch(kek_id):
                raise VaultError(_KEK_ID_RULE)
            if kek_id in self._ciphers:
                raise VaultError(f"KEK id {kek_id!r} appears twice")
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise VaultError(f"KEK {kek_id!r} must be {KEY_BYTES} bytes")
            self._ciphers[kek_id] = AESGCM(key)
            self._newest_id = kek_id
        if not self._ciphers:
            raise VaultError("a key ring needs at least one KEK")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KeyRing | None:
        """Read SIDECAR_KEK_FILE's keys, then SIDECAR_KEK's (newest last). Neither set (or blank) -> None."""
        entries: list[_Entry] = []
        path = env.get(ENV_KEK_FILE, "").strip()
        if path:
            entries += _entries_from_file(path)
        value = env.get(ENV_KEK, "").strip()
        if value:
            entries += _entries_from_env_value(value)
        if not entries:
            return None
        return cls((entry.kek_id, entry.key) for entry in _merge(entries))

    @property
    def newest_id(self) -> str:
        return self._newest_id

    def ids(self) -> tuple[str, ...]:
        """Known KEK ids, oldest first."""
        return tuple(self._ciphers)

    def _cipher(self, kek_id: str) -> AESGCM:
        cipher = self._ciphers.get(kek_id)
        if cipher is None:
            raise KekMissing(
                f"stored key was sealed under KEK {kek_id!r}, which is not configured "
                f"(configured: {', '.join(self._ciphers)}); add it to {ENV_KEK} or {ENV_KEK_FILE}"
            )
        return cipher

    def __repr__(self) -> str:
        return f"KeyRing(ids={self.ids()!r}, newest={self._newest_id!r})"


# ---------------------------------------------------------------------------------------------------------
# Sealing


def _encrypt(cipher: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    # Random 96-bit nonces: each DEK encrypts exactly once, and a KEK would need ~2^32 wraps before the
    # nonce-collision risk matters.
    nonce = os.urandom(NONCE_BYTES)
    return nonce + cipher.encrypt(nonce, plaintext, aad)


def _decrypt(cipher: AESGCM, blob: bytes, aad: bytes, what: str, exact_len: int | None = None) -> bytes:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise VaultError(f"stored key is malformed: its {what} is not bytes")
    blob = bytes(blob)
    if len(blob) < NONCE_BYTES + TAG_BYTES or (exact_len is not None and len(blob) != exact_len):
        raise VaultError(f"stored key is malformed: its {what} has the wrong length (truncated?)")
    try:
        return cipher.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise VaultError(_TAMPERED) from None


def _utf8(secret: str) -> bytes:
    if not isinstance(secret, str):
        raise TypeError("secret must be str")
    try:
        return secret.encode("utf-8")
    except UnicodeEncodeError:
        pass  # raised below, outside this block: the encode error object holds the whole secret
    del secret  # nor should this frame's locals, which error trackers record
    raise VaultError("secret is not valid Unicode text (it contains a lone surrogate)")


def _text(plaintext: bytes) -> str:
    try:
        return plaintext.decode("utf-8")
    except UnicodeDecodeError:
        pass  # raised below, outside this block: the decode error object holds the whole plaintext
    del plaintext
    raise VaultError("stored key is not UTF-8 text")


class Vault:
    """Seals and opens BYOK secrets under a KeyRing. Holds no decrypted secret between calls."""

    __slots__ = ("_ring",)

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring

    @property
    def ring(self) -> KeyRing:
        return self._ring

    def seal(self, secret: str, aad: bytes) -> Sealed:
        """Encrypt `secret` under a fresh data key, wrapped by the newest KEK."""
        plaintext = _utf8(secret)
        dek = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        ciphertext = _encrypt(AESGCM(dek), plaintext, aad)
        kek_id = self._ring.newest_id
        return Sealed(kek_id, _encrypt(self._ring._cipher(kek_id), dek, aad), ciphertext)

    def open(self, sealed: Sealed, aad: bytes) -> str:
        """The secret; KekMissing if its KEK is not configured, VaultError if anything fails authentication."""
        dek_cipher = AESGCM(self._unwrap(sealed, aad))
        return _text(_decrypt(dek_cipher, sealed.ciphertext, aad, "ciphertext"))

    def rewrap(self, sealed: Sealed, aad: bytes) -> Sealed:
        """The same sealed key with its data key wrapped by the newest KEK. The secret is never decrypted."""
        newest = self._ring.newest_id
        if sealed.kek_id == newest:
            return sealed
        wrapped = _encrypt(self._ring._cipher(newest), self._unwrap(sealed, aad), aad)
        return Sealed(newest, wrapped, sealed.ciphertext)

    def _unwrap(self, sealed: Sealed, aad: bytes) -> bytes:
        kek = self._ring._cipher(sealed.kek_id)
        return _decrypt(kek, sealed.wrapped_dek, aad, "wrapped data key", exact_len=WRAPPED_DEK_BYTES)

    def __repr__(self) -> str:
        return f"Vault(ring={self._ring!r})"
