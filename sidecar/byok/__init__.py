"""BYOK: customers' own provider keys, sealed at rest by envelope encryption (DESIGN.md §9)."""

from sidecar.byok.vault import (
    KekMissing,
    KeyRing,
    Sealed,
    Vault,
    VaultError,
    binding,
    check_startup,
    generate_kek,
)

__all__ = [
    "KekMissing",
    "KeyRing",
    "Sealed",
    "Vault",
    "VaultError",
    "binding",
    "check_startup",
    "generate_kek",
]
