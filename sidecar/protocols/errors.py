"""The sidecar's own errors, independent of any wire protocol.

A protocol module renders a SidecarError in its own envelope, so an OpenAI client sees an
OpenAI-shaped error and an Anthropic client an Anthropic-shaped one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.errors import ApiError

# kind -> (HTTP status, OpenAI error type)
KINDS: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "authentication": (401, "authentication_error"),
    "payment_required": (402, "insufficient_quota"),
    "permission": (403, "permission_error"),
    "not_found": (404, "not_found_error"),
    "conflict": (409, "conflict_error"),
    "too_large": (413, "invalid_request_error"),
    "rate_limited": (429, "rate_limit_error"),
    "client_closed": (499, "api_error"),  # nginx's code: the client hung up; nobody reads this answer
    "internal": (500, "api_error"),
    "upstream": (502, "api_error"),
    "unavailable": (503, "service_unavailable"),
    "timeout": (504, "timeout_error"),
}


@dataclass
class SidecarError(ApiError):
    kind: str
    message: str
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind
        super().__init__(self.message)

    @property
    def status(self) -> int:
        return KINDS[self.kind][0]


def payment_required(message: str = "insufficient credits") -> SidecarError:
    """402 PAYMENT_REQUIRED in the client's protocol envelope; the message says which limit refused."""
    return SidecarError("payment_required", message, code="PAYMENT_REQUIRED")
