"""Per-caller rate limits for the inference service: a token bucket for each authenticated caller.

A bucket holds up to `burst` tokens and refills at `rate_per_s`; a request takes one token or is
refused. Buckets are refilled lazily when their caller next calls, so an idle caller costs nothing,
and callers are named by tokens or client certificates, so their number is bounded by configuration.
"""

from __future__ import annotations

import math
import time


class RateLimiter:
    """Token buckets by caller name, used on the event loop only (no locking)."""

    def __init__(self, rate_per_s: float, burst: int = 0) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be positive, not {rate_per_s}")
        self.rate_per_s = rate_per_s
        self.burst = float(burst or max(1, math.ceil(rate_per_s)))
        self._buckets: dict[str, list[float]] = {}  # caller -> [tokens, monotonic time of the last refill]

    def take(self, caller: str) -> float:
        """Take a token from `caller`'s bucket: 0.0 if there was one, else the seconds until there is."""
        now = time.monotonic()
        bucket = self._buckets.get(caller)
        if bucket is None:
            self._buckets[caller] = [self.burst - 1.0, now]
            return 0.0
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate_per_s)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return (1.0 - tokens) / self.rate_per_s
        bucket[0] = tokens - 1.0
        return 0.0
