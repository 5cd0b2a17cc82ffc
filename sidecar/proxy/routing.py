"""Which targets may serve a call, in which order, and why (issue 16.6: cost-aware routing).

Pure: the targets of a model, their prices and the call's worst case in; an ordered plan out. The
hold is the worst case over the plan's targets, so a fallback never costs more than the call was held
for; a target the workspace cannot cover is dropped from the plan (skipped, recorded) rather than
failing the call, which gets a 402 only when no target fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from sidecar.config import ModelConfig, Target
from sidecar.pricing import ModelPrice, Reach
from sidecar.protocols.base import unpriced

LONG_CONTEXT_PARAM = "anthropic-beta"


@dataclass(frozen=True, slots=True)
class Plan:
    """The targets a call may go to, in the order they are tried, each with the call's ceiling there."""

    targets: tuple[Target, ...]
    ceilings_micro: tuple[int, ...]
    policy: str  # the model's routing: order, priority, cheapest
    skipped: tuple[str, ...] = ()  # "<why>:<provider>/<upstream model>" of each target left out

    @property
    def ceiling_micro(self) -> int:
        return max(self.ceilings_micro)

    def reason(self, served: int) -> str:
        """Why the target at `served` (0-based, in plan order) took the call, for the ledger row."""
        chosen = self.policy if served == 0 else f"fallback:{served + 1}"
        return ";".join((chosen, *self.skipped))


def label(target: Target) -> str:
    return f"{target.provider}/{target.upstream_model}"


def plan(
    model: ModelConfig,
    targets: tuple[Target, ...],
    price_of: Callable[[Target], ModelPrice],
    ceiling_of: Callable[[ModelPrice], int],
    reach: Reach,
    long_context: bool,
) -> Plan:
    """The targets that can price everything the request may incur, ordered by the model's routing.
    None can: the first reason, as a 400 `unsupported_feature` in the client's protocol."""
    kept, ceilings, skipped, refusal = [], [], [], None
    for target in targets:
        price = price_of(target)
        missing = price.sell.unpriced_for(reach)
        param = reach.param_of(missing) if missing else None
        if missing is None and long_context and not price.sell.tiers:
            missing, param = "long-context input (a price without context-length tiers)", LONG_CONTEXT_PARAM
        if missing is not None:
            refusal = refusal or (missing, param or "model")
            skipped.append(f"skipped_unpriced:{label(target)}")
            continue
        kept.append(target)
        ceilings.append(ceiling_of(price))
    if not kept:
        raise unpriced(*refusal)
    order = list(range(len(kept)))  # stable sorts: ties keep the listed order
    if model.routing == "priority":
        order.sort(key=lambda i: kept[i].priority)
    elif model.routing == "cheapest":
        order.sort(key=lambda i: ceilings[i])
    return Plan(
        targets=tuple(kept[i] for i in order),
        ceilings_micro=tuple(ceilings[i] for i in order),
        policy=model.routing,
        skipped=tuple(skipped),
    )


def affordable(current: Plan, available_micro: int) -> Plan | None:
    """The plan without the targets whose ceiling exceeds what the workspace has free, or None when no
    target would be dropped (the refusal stands) or none would remain."""
    keep = [i for i, ceiling in enumerate(current.ceilings_micro) if ceiling <= available_micro]
    if not keep or len(keep) == len(current.targets):
        return None
    dropped = tuple(f"skipped_unaffordable:{label(t)}" for i, t in enumerate(current.targets) if i not in set(keep))
    return replace(
        current,
        targets=tuple(current.targets[i] for i in keep),
        ceilings_micro=tuple(current.ceilings_micro[i] for i in keep),
        skipped=current.skipped + dropped,
    )
