"""One call's state as it moves through the lifecycle."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sidecar.auth import Caller
from sidecar.config import ModelConfig, Target
from sidecar.pricing import ModelPrice
from sidecar.protocols.base import Protocol, StreamReader
from sidecar.proxy.budget import Reservation
from sidecar.proxy.routing import Plan
from sidecar.scrub import Scrubber

NO_SECRETS = Scrubber(())


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Call:
    protocol: Protocol
    request_id: str
    started_ms: int
    started_perf: float = field(default_factory=time.perf_counter)
    caller: Caller | None = None
    model: ModelConfig | None = None
    targets: tuple[Target, ...] = ()  # the plan's, in the order they are tried
    plan: Plan | None = None  # the targets that may serve the call and why (proxy/routing.py)
    available_micro: int = 0  # what the workspace had free when admission refused the dearest plan
    implied_web_searches: int = 0  # billed even when the usage does not count them
    target: Target | None = None  # the target being tried, then the one that served
    # The served target's price (or the model OpenRouter says it used), as in force when the call arrived.
    price: ModelPrice | None = None
    served_model: str | None = None
    attempts: int = 0
    fallback_reason: str | None = None
    hold_micro: int = 0  # what is held now: 0 while the call runs on the customer's own key
    credits_ceiling_micro: int = 0  # the worst case on the platform's key (the hold on credits)
    byok: bool = False  # the call went upstream with the customer's own key
    postpaid: bool = False  # admitted post-charge: nothing held, the actual cost debited at settle
    byok_fallback_reason: str | None = None
    ceiling_tokens: int = 0  # the input bound plus the output bound, for the token rate limit
    output_cap: int = 0
    request_bytes: int = 0
    idempotency_key: str | None = None
    session_id: str | None = None
    first_byte_ms: int | None = None
    relayed: list[bytes] | None = None  # kept only when an idempotency key asks for a replayable outcome
    relayed_bytes: int = 0
    relay_keep_max_bytes: int = 0
    reader: StreamReader | None = None  # the relayed stream's reader: what was observed so far
    expired_template: bytes = b""  # the call's ledger event should its process die (admission keeps it)
    # Redacts every credential this call has sent upstream from what it relays, stores and logs: a
    # provider may quote the key it was sent.
    scrubber: Scrubber = NO_SECRETS
    buffered: Reservation | None = None  # the memory a buffered answer holds until it is sent
    rate_headers: dict[str, str] = field(default_factory=dict)

    @property
    def route_reason(self) -> str | None:
        """Why the call went to its target: the routing policy, the fallback, and the targets skipped."""
        return self.plan.reason(max(self.attempts, 1) - 1) if self.plan is not None else None

    @property
    def provider(self) -> str:
        return self.target.provider if self.target else self.model.provider

    def keep_relayed(self, out: bytes) -> None:
        if self.relayed is None:
            return
        self.relayed.append(out)
        self.relayed_bytes += len(out)
        if self.relayed_bytes > self.relay_keep_max_bytes:
            self.relayed = None  # too large to replay: remembered as done, not kept

    def relayed_body(self) -> bytes | None:
        return b"".join(self.relayed) if self.relayed is not None else None
