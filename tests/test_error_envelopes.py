"""Every error kind the sidecar raises renders in every protocol's envelope (found by `make fuzz`:
Anthropic's envelope had no type for `client_closed`, so rendering it raised KeyError)."""

from __future__ import annotations

import orjson
import pytest

from sidecar.protocols import ALL as PROTOCOLS
from sidecar.protocols.errors import KINDS, SidecarError


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.name)
def test_every_error_kind_renders_in_every_envelope(protocol, kind: str) -> None:
    body = orjson.loads(protocol.error_body(SidecarError(kind, "why it failed", code="some_code")))
    inner = body["error"]
    assert inner["message"] == "why it failed"
    assert isinstance(inner["type"], str) and inner["type"]
    if protocol.family == "anthropic":
        assert body["type"] == "error"
