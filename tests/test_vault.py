"""The BYOK vault: envelope encryption that fails closed, rotates without plaintext, and never leaks secrets."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from sidecar.byok import KekMissing, KeyRing, Sealed, Vault, VaultError, binding, check_startup, generate_kek
from sidecar.byok.vault import NONCE_BYTES, WRAPPED_DEK_BYTES

OLD_KEY = bytes(range(32))
NEW_KEY = bytes(range(100, 132))
OLD_B64 = base64.b64encode(OLD_KEY).decode()
NEW_B64 = base64.b64encode(NEW_KEY).decode()
SECRET = "sk-live-0123456789abcdefSECRET"
AAD = binding("ws_1", "office_1", "openai")

VAULT = Vault(KeyRing([("old", OLD_KEY)]))


def unwrap_dek(sealed: Sealed, kek: bytes, aad: bytes) -> bytes:
    """Independently of the vault: check the documented layout (nonce || AES-GCM) of wrapped_dek."""
    blob = sealed.wrapped_dek
    return AESGCM(kek).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)


def flipped(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# ---------------------------------------------------------------------------------------------------------
# Round trip and freshness


@given(secret=st.text(), workspace=st.text(min_size=1), office=st.none() | st.text(), provider=st.text(min_size=1))
def test_round_trip_any_unicode(secret: str, workspace: str, office: str | None, provider: str) -> None:
    aad = binding(workspace, office, provider)
    sealed = VAULT.seal(secret, aad)
    assert sealed.kek_id == "old"
    assert len(sealed.wrapped_dek) == WRAPPED_DEK_BYTES
    assert VAULT.open(sealed, aad) == secret


def test_each_seal_uses_a_new_data_key_and_nonces() -> None:
    first, second = VAULT.seal(SECRET, AAD), VAULT.seal(SECRET, AAD)
    assert first.ciphertext != second.ciphertext
    assert first.wrapped_dek[:NONCE_BYTES] != second.wrapped_dek[:NONCE_BYTES]
    assert first.ciphertext[:NONCE_BYTES] != second.ciphertext[:NONCE_BYTES]
    assert unwrap_dek(first, OLD_KEY, AAD) != unwrap_dek(second, OLD_KEY, AAD)


def test_ciphertext_layout_is_nonce_then_gcm_under_the_data_key() -> None:
    sealed = VAULT.seal(SECRET, AAD)
    dek = unwrap_dek(sealed, OLD_KEY, AAD)
    nonce, body = sealed.ciphertext[:NONCE_BYTES], sealed.ciphertext[NONCE_BYTES:]
    assert AESGCM(dek).decrypt(nonce, body, AAD) == SECRET.encode()


# ---------------------------------------------------------------------------------------------------------
# Failing closed


@pytest.mark.parametrize(
    "other",
    [
        binding("ws_2", "office_1", "openai"),  # another workspace's row
        binding("ws_1", "office_2", "openai"),  # another office
        binding("ws_1", None, "openai"),  # the workspace-level key
        binding("ws_1", "office_1", "anthropic"),  # another provider
    ],
)
def test_ciphertext_moved_to_another_row_fails_closed(other: bytes) -> None:
    sealed = VAULT.seal(SECRET, AAD)
    with pytest.raises(VaultError, match="failed authentication") as info:
        VAULT.open(sealed, other)
    assert not isinstance(info.value, KekMissing)
    # Rotation checks the binding too, so it cannot launder a moved row.
    with pytest.raises(VaultError, match="failed authentication"):
        Vault(KeyRing([("old", OLD_KEY), ("new", NEW_KEY)])).rewrap(sealed, other)


def test_a_flipped_byte_anywhere_fails_closed() -> None:
    sealed = VAULT.seal(SECRET, AAD)
    for field in ("wrapped_dek", "ciphertext"):
        data = getattr(sealed, field)
        for index in range(len(data)):
            tampered = Sealed(**{**_fields(sealed), field: flipped(data, index)})
            with pytest.raises(VaultError, match="failed authentication"):
                VAULT.open(tampered, AAD)


def test_a_data_key_wrapped_under_another_known_kek_id_fails_closed() -> None:
    vault = Vault(KeyRing([("old", OLD_KEY), ("new", NEW_KEY)]))
    sealed = vault.seal(SECRET, AAD)
    with pytest.raises(VaultError, match="failed authentication"):
        vault.open(Sealed("old", sealed.wrapped_dek, sealed.ciphertext), AAD)


def test_truncated_or_extended_data_fails_with_a_vault_error() -> None:
    sealed = VAULT.seal(SECRET, AAD)
    for field in ("wrapped_dek", "ciphertext"):
        data = getattr(sealed, field)
        for cut in [*range(len(data)), len(data) + 1]:
            damaged = data[:cut] if cut < len(data) else data + b"\0"
            with pytest.raises(VaultError):  # an IndexError or ValueError would escape this
                VAULT.open(Sealed(**{**_fields(sealed), field: damaged}), AAD)


def test_stored_values_of_the_wrong_type_fail_with_a_vault_error() -> None:
    sealed = VAULT.seal(SECRET, AAD)
    with pytest.raises(VaultError, match="malformed"):
        VAULT.open(Sealed(sealed.kek_id, sealed.wrapped_dek, None), AAD)  # type: ignore[arg-type]
    # What a driver may hand back for bytea still works.
    assert VAULT.open(Sealed(sealed.kek_id, memoryview(sealed.wrapped_dek), sealed.ciphertext), AAD) == SECRET


def test_unknown_kek_id_raises_kek_missing_naming_it() -> None:
    sealed = VAULT.seal(SECRET, AAD)
    with pytest.raises(KekMissing, match="'retired-2023'"):
        VAULT.open(Sealed("retired-2023", sealed.wrapped_dek, sealed.ciphertext), AAD)


# ---------------------------------------------------------------------------------------------------------
# Rotation


def test_rotation_then_removing_the_old_kek_still_opens_every_key() -> None:
    rows = {binding(f"ws_{n}", None, "openai"): f"{SECRET}-{n}" for n in range(5)}
    sealed = {aad: Vault(KeyRing([("old", OLD_KEY)])).seal(secret, aad) for aad, secret in rows.items()}

    rotating = Vault(KeyRing([("old", OLD_KEY), ("new", NEW_KEY)]))
    rotated = {aad: rotating.rewrap(s, aad) for aad, s in sealed.items()}
    for aad, after in rotated.items():
        before = sealed[aad]
        assert after.kek_id == "new"
        assert after.ciphertext == before.ciphertext  # the secret itself was not touched
        assert after.wrapped_dek != before.wrapped_dek
        assert rotating.rewrap(after, aad) is after  # already under the newest: nothing to do

    new_only = Vault(KeyRing([("new", NEW_KEY)]))
    assert {aad: new_only.open(s, aad) for aad, s in rotated.items()} == rows
    with pytest.raises(KekMissing, match="'old'"):
        new_only.open(next(iter(sealed.values())), next(iter(sealed)))


def test_new_seals_use_the_newest_kek() -> None:
    vault = Vault(KeyRing([("old", OLD_KEY), ("new", NEW_KEY)]))
    assert vault.seal(SECRET, AAD).kek_id == "new"


# ---------------------------------------------------------------------------------------------------------
# No leaks


def test_no_secret_or_key_in_any_repr_str_or_error() -> None:
    ring = KeyRing([("old", OLD_KEY), ("new", NEW_KEY)])
    vault = Vault(ring)
    sealed = vault.seal(SECRET, AAD)
    texts = [repr(sealed), str(sealed), repr(vault), str(vault), repr(ring), str(ring)]
    for attempt in (
        lambda: vault.open(sealed, binding("ws_2", None, "openai")),
        lambda: vault.open(Sealed("gone", sealed.wrapped_dek, sealed.ciphertext), AAD),
        lambda: vault.open(Sealed(sealed.kek_id, sealed.wrapped_dek, sealed.ciphertext[:-1]), AAD),
        lambda: vault.open(Sealed(sealed.kek_id, sealed.wrapped_dek[:10], sealed.ciphertext), AAD),
    ):
        with pytest.raises(VaultError) as info:
            attempt()
        texts += [str(info.value), repr(info.value)]
    dek = unwrap_dek(sealed, NEW_KEY, AAD)
    forbidden = [SECRET, OLD_B64, NEW_B64, repr(OLD_KEY), repr(NEW_KEY), repr(dek), repr(sealed.ciphertext)]
    for text in texts:
        for needle in forbidden:
            assert needle not in text
    assert "old" in repr(ring) and "new" in repr(ring)  # ids are fine, and useful


def test_a_secret_that_is_not_valid_unicode_is_refused_without_echo() -> None:
    secret = "sk-secret-\ud800-tail"
    with pytest.raises(VaultError, match="not valid Unicode") as info:
        VAULT.seal(secret, AAD)
    assert "sk-secret" not in str(info.value)
    # No chained UnicodeEncodeError, whose .object would carry the whole secret into error reports.
    assert info.value.__context__ is None and info.value.__cause__ is None


# ---------------------------------------------------------------------------------------------------------
# The associated data


def test_binding_is_versioned_and_unambiguous() -> None:
    assert binding("a", "b", "c").startswith(b"byok/v1\0")
    distinct = {
        binding("a", "b", "c"),
        binding("a", None, "c"),
        binding("a", "", "c"),
        binding("a,b", None, "c"),
        binding("a", "b,c", ""),
        binding('a", "b', None, "c"),
    }
    assert len(distinct) == 6
    with pytest.raises(TypeError):
        binding(1, None, "c")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# KEK configuration


def test_from_env_with_nothing_set_is_none() -> None:
    assert KeyRing.from_env({}) is None
    assert KeyRing.from_env({"SIDECAR_KEK": "  ", "SIDECAR_KEK_FILE": ""}) is None


def test_from_env_single_bare_key_gets_a_derived_id() -> None:
    ring = KeyRing.from_env({"SIDECAR_KEK": OLD_B64})
    assert ring is not None
    assert ring.ids() == (hashlib.sha256(OLD_KEY).hexdigest()[:8],)
    assert ring.newest_id == ring.ids()[0]


def test_from_env_accepts_unpadded_base64url() -> None:
    url = base64.urlsafe_b64encode(NEW_KEY).decode().rstrip("=")
    ring = KeyRing.from_env({"SIDECAR_KEK": f"k1:{url}"})
    assert ring is not None
    sealed = Vault(ring).seal(SECRET, AAD)
    assert unwrap_dek(sealed, NEW_KEY, AAD)  # the key decoded to exactly NEW_KEY


def test_from_env_list_last_is_newest() -> None:
    ring = KeyRing.from_env({"SIDECAR_KEK": f"old:{OLD_B64}, new:{NEW_B64}"})
    assert ring is not None
    assert ring.ids() == ("old", "new")
    assert ring.newest_id == "new"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "kek"
    path.write_text(text)
    return str(path)


def test_from_env_file_with_comments_and_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, f"# rotated 2025-01\n\nold:{OLD_B64}\n   \n  # current\nnew:{NEW_B64}\n")
    ring = KeyRing.from_env({"SIDECAR_KEK_FILE": path})
    assert ring is not None
    assert ring.ids() == ("old", "new")
    assert ring.newest_id == "new"


def test_from_env_file_then_variable_which_is_newest(tmp_path: Path) -> None:
    path = write(tmp_path, f"old:{OLD_B64}\n")
    ring = KeyRing.from_env({"SIDECAR_KEK_FILE": path, "SIDECAR_KEK": f"new:{NEW_B64}"})
    assert ring is not None
    assert ring.ids() == ("old", "new")
    # The same KEK in both places is one KEK, at the variable's (newest) position.
    path = write(tmp_path, f"new:{NEW_B64}\nold:{OLD_B64}\n")
    ring = KeyRing.from_env({"SIDECAR_KEK_FILE": path, "SIDECAR_KEK": f"new:{NEW_B64}"})
    assert ring is not None
    assert ring.ids() == ("old", "new")


def test_from_env_same_id_with_two_keys_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, f"k:{OLD_B64}\n")
    with pytest.raises(VaultError, match=r"'k' has two different keys \(SIDECAR_KEK_FILE line 1 and SIDECAR_KEK") as i:
        KeyRing.from_env({"SIDECAR_KEK_FILE": path, "SIDECAR_KEK": f"k:{NEW_B64}"})
    assert OLD_B64 not in str(i.value) and NEW_B64 not in str(i.value)


SHORT_B64 = base64.b64encode(b"0123456789abcdef").decode()  # 16 bytes: AES-128, not allowed
HEX_KEY = NEW_KEY.hex()  # `openssl rand -hex 32`: decodes as base64 to 48 bytes


@pytest.mark.parametrize(
    ("value", "message", "material"),
    [
        (f"{OLD_B64[:-2]}!!", r"^SIDECAR_KEK: the key is not valid base64", OLD_B64[:-2]),
        (SHORT_B64, r"^SIDECAR_KEK: the key must be 32 bytes of base64, got 16 bytes", SHORT_B64),
        (HEX_KEY, r"got 48 bytes", HEX_KEY),
        (f"a:{OLD_B64},b:{SHORT_B64}", r"^SIDECAR_KEK entry 2: the key must be 32 bytes", SHORT_B64),
        (f"a:{OLD_B64},", r"^SIDECAR_KEK entry 2: expected", OLD_B64),
        (f"a:{OLD_B64},{NEW_B64}", r"^SIDECAR_KEK entry 2: expected", NEW_B64),
        (f":{OLD_B64}", r"^SIDECAR_KEK entry 1: a KEK id must be", OLD_B64),
        (f"bad id:{OLD_B64}", r"^SIDECAR_KEK entry 1: a KEK id must be", OLD_B64),
        (f"{NEW_B64}:{OLD_B64}", r"^SIDECAR_KEK entry 1: a KEK id must be", NEW_B64),  # pasted the wrong way round
        ("k:", r"^SIDECAR_KEK entry 1: expected", "k:"),
    ],
)
def test_malformed_variable_is_refused_without_echoing_key_material(value: str, message: str, material: str) -> None:
    with pytest.raises(VaultError, match=message) as info:
        KeyRing.from_env({"SIDECAR_KEK": value})
    if len(material) > 4:
        assert material not in str(info.value)
        assert material[:12] not in str(info.value)


def test_malformed_file_line_is_named_without_echoing_key_material(tmp_path: Path) -> None:
    path = write(tmp_path, f"# header\nold:{OLD_B64}\n{NEW_B64}\n")
    with pytest.raises(VaultError, match=r"^SIDECAR_KEK_FILE line 3: expected") as info:
        KeyRing.from_env({"SIDECAR_KEK_FILE": path})
    assert NEW_B64[:12] not in str(info.value) and OLD_B64[:12] not in str(info.value)


def test_unreadable_or_empty_file_is_refused(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(VaultError, match=r"SIDECAR_KEK_FILE: cannot read .*nope"):
        KeyRing.from_env({"SIDECAR_KEK_FILE": missing})
    with pytest.raises(VaultError, match="contains no keys"):
        KeyRing.from_env({"SIDECAR_KEK_FILE": write(tmp_path, "# nothing yet\n\n")})
    (tmp_path / "binary").write_bytes(b"k:\xff\xfe" + OLD_KEY)
    with pytest.raises(VaultError, match="not UTF-8") as info:
        KeyRing.from_env({"SIDECAR_KEK_FILE": str(tmp_path / "binary")})
    assert info.value.__context__ is None


@pytest.mark.parametrize("key", [b"", b"x" * 16, b"x" * 31, b"x" * 33, b"x" * 64])
def test_a_kek_that_is_not_32_bytes_is_refused(key: bytes) -> None:
    with pytest.raises(VaultError, match="must be 32 bytes"):
        KeyRing([("k", key)])


def test_key_ring_refuses_empty_duplicate_and_bad_ids() -> None:
    with pytest.raises(VaultError, match="at least one"):
        KeyRing([])
    with pytest.raises(VaultError, match="appears twice"):
        KeyRing([("k", OLD_KEY), ("k", NEW_KEY)])
    with pytest.raises(VaultError, match="KEK id must be"):
        KeyRing([("x" * 33, OLD_KEY)])


def test_generate_kek_is_usable_and_random() -> None:
    first, second = generate_kek(), generate_kek()
    assert first != second
    ring = KeyRing.from_env({"SIDECAR_KEK": first})
    assert ring is not None
    kek_id, _, key_b64 = first.partition(":")
    assert ring.ids() == (kek_id,)
    # The same key given bare gets the same id, so moving from one form to the other keeps old rows readable.
    bare = KeyRing.from_env({"SIDECAR_KEK": key_b64})
    assert bare is not None and bare.ids() == (kek_id,)


# ---------------------------------------------------------------------------------------------------------
# Start-up


def test_startup_refuses_stored_keys_without_their_kek() -> None:
    check_startup(None, [])  # no BYOK keys: no KEK needed
    with pytest.raises(KekMissing, match="no key-encryption key is configured: set SIDECAR_KEK or SIDECAR_KEK_FILE"):
        check_startup(None, ["old"])
    ring = KeyRing([("new", NEW_KEY)])
    with pytest.raises(KekMissing, match=r"sealed under KEK old, which is not configured \(configured: new\)"):
        check_startup(ring, ["old", "new"])
    check_startup(KeyRing([("old", OLD_KEY), ("new", NEW_KEY)]), ["old", "new", "new"])


def _fields(sealed: Sealed) -> dict[str, object]:
    return {"kek_id": sealed.kek_id, "wrapped_dek": sealed.wrapped_dek, "ciphertext": sealed.ciphertext}
