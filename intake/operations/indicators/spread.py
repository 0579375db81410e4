"""A duration's distribution (count, nearest-rank p50 and p90, mean), shared by every figure."""

from __future__ import annotations

import math

from pydantic import BaseModel


class Spread(BaseModel):
    """A duration's distribution, in seconds (nearest-rank percentiles); None when no samples."""

    count: int = 0
    p50: float | None = None
    p90: float | None = None
    mean: float | None = None


def spread(samples: list[float]) -> Spread:
    """Count, nearest-rank p50 and p90, and mean of ``samples`` (seconds)."""
    if not samples:
        return Spread()
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]

    return Spread(count=len(ordered), p50=rank(0.5), p90=rank(0.9), mean=sum(ordered) / len(ordered))
