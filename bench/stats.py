"""Percentiles of latency samples (integer microseconds)."""

from __future__ import annotations

import math

PERCENTILES = {"p50": 50, "p90": 90, "p99": 99, "p999": 99.9}


def percentile(ordered: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list; 0.0 when empty."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def summarize(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)
    out = {name: percentile(ordered, q) for name, q in PERCENTILES.items()}
    out["count"] = len(ordered)
    out["mean"] = sum(ordered) / len(ordered) if ordered else 0.0
    out["max"] = float(ordered[-1]) if ordered else 0.0
    return out
