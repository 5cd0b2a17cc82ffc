"""How a call ended: the one value the lifecycle settles from.

The forwarding and relay steps never settle. Each returns an `Ending`: the call's `Outcome` (what the
ledger records and what is charged) and `reply`, what the client gets once the settlement is done.
So however a call ends, `handler._lifecycle` settles it exactly once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

from aiohttp import web

from sidecar.pricing import Usage
from sidecar.state.store import SettleResult


class CallStatus(StrEnum):
    """The ledger's status of a finished call (`expired` is the sweeper's, never the handler's)."""

    COMPLETED = "completed"
    FAILED = "failed"
    # The call stopped before the provider finished: the client left, or the sidecar cut it off
    # (its own total, idle or write timeout). Billed for what was observed.
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Replay:
    """A completed answer kept under the call's idempotency key, for a retry to receive."""

    status: int
    content_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    status: CallStatus
    usage: Usage | None = None  # None: nothing counted (charged 0)
    estimated: bool = False  # the usage is the sidecar's estimate, not the provider's count
    error: str | None = None  # why the call did not complete, for the ledger row
    replay: Replay | None = None

    @classmethod
    def failed(cls, error: str, usage: Usage | None = None, estimated: bool = False) -> Outcome:
        return cls(CallStatus.FAILED, usage, estimated, error)


# What the client gets once the call is settled: a response, or a raised SidecarError.
Reply = Callable[[SettleResult | None], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Ending:
    outcome: Outcome
    reply: Reply


def refusal(error: Exception) -> Reply:
    """A reply that answers the client with `error` (a SidecarError) after settlement."""

    async def reply(_: SettleResult | None) -> web.StreamResponse:
        raise error

    return reply


def failed(reason: str, error: Exception) -> Ending:
    """The call failed before any byte reached the client: charged nothing, the client gets `error`."""
    return Ending(Outcome.failed(reason), refusal(error))
