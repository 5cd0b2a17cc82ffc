"""Bad input to the admin API gets a 400 in the admin envelope, never a 500 (issue 8.14)."""

from __future__ import annotations

import secrets

import pytest
from support.harness import Sidecar


async def _workspace(sidecar: Sidecar) -> str:
    ws = f"ws_{secrets.token_hex(6)}"
    status, _ = await sidecar.admin("POST", "/workspaces", {"id": ws})
    assert status == 201
    return ws


@pytest.mark.parametrize("tpm", [2**31, 10**10, 2**63, -1, 0, 1.5, "100"])
async def test_tokens_per_minute_beyond_its_column_is_400(sidecar: Sidecar, tpm):
    ws = await _workspace(sidecar)
    status, body = await sidecar.admin("POST", f"/workspaces/{ws}/keys", {"tokens_per_minute": tpm})
    assert status == 400, body
    assert body["error"]["code"] == "invalid_rate_limit"
    status, listed = await sidecar.admin("GET", f"/workspaces/{ws}/keys")
    assert status == 200 and listed["data"] == []


async def test_the_largest_integer_the_column_holds_is_accepted(sidecar: Sidecar):
    ws = await _workspace(sidecar)
    status, body = await sidecar.admin("POST", f"/workspaces/{ws}/keys", {"tokens_per_minute": 2**31 - 1})
    assert status == 201, body
    assert body["tokens_per_minute"] == 2**31 - 1


@pytest.mark.parametrize("rpm", [2**31, 2**63, 10**7])
async def test_rate_limit_rpm_out_of_range_is_400(sidecar: Sidecar, rpm):
    ws = await _workspace(sidecar)
    status, body = await sidecar.admin("POST", f"/workspaces/{ws}/keys", {"rate_limit_rpm": rpm})
    assert status == 400, body


@pytest.mark.parametrize(
    "path_of",
    [
        lambda ws: "/workspaces",
        lambda ws: f"/workspaces/{ws}/offices",
        lambda ws: f"/workspaces/{ws}/keys",
    ],
)
@pytest.mark.parametrize("name", ["bad\x00name", "line\nbreak", "x" * 201, 42])
async def test_a_name_with_nul_or_control_characters_or_not_text_is_400(sidecar: Sidecar, path_of, name):
    ws = await _workspace(sidecar)
    status, body = await sidecar.admin("POST", path_of(ws), {"name": name})
    assert status == 400, body
    assert body["error"] == {"message": body["error"]["message"], "type": "admin_error", "code": "invalid_name"}


async def test_a_printable_unicode_name_is_kept(sidecar: Sidecar):
    ws = f"ws_{secrets.token_hex(6)}"
    status, body = await sidecar.admin("POST", "/workspaces", {"id": ws, "name": "Büro Zürich"})
    assert status == 201 and body["name"] == "Büro Zürich"


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\x00", " "])
async def test_an_id_with_a_trailing_newline_does_not_create_a_look_alike(sidecar: Sidecar, suffix):
    ws = f"ws_{secrets.token_hex(6)}"
    status, _ = await sidecar.admin("POST", "/workspaces", {"id": ws})
    assert status == 201
    status, body = await sidecar.admin("POST", "/workspaces", {"id": ws + suffix})
    assert status == 400, body
    assert body["error"]["code"] == "invalid_id"
    assert ws + suffix not in await sidecar.workspace_ids()
    status, body = await sidecar.admin("POST", f"/workspaces/{ws}/offices", {"id": "of1" + suffix})
    assert status == 400, body
    status, body = await sidecar.admin("POST", f"/workspaces/{ws}/grants", {"grant_id": "g1" + suffix, "amount": "1"})
    assert status == 400, body


@pytest.mark.parametrize("key_id", ["key%00x", "key%0A"])
async def test_a_key_id_with_nul_or_newline_in_the_path_is_400(sidecar: Sidecar, key_id):
    ws = await _workspace(sidecar)
    status, body = await sidecar.admin("POST", f"/workspaces/{ws}/keys/{key_id}/revoke")
    assert status == 400, body
    status, body = await sidecar.admin("POST", f"/workspaces/{ws}/byok-keys/{key_id}/deactivate")
    assert status == 400, body
