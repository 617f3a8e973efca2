"""Token-bucket rate limits kept in process memory.

Each verifier process counts on its own, so N replicas behind a load balancer allow up to N times
the configured rate. That bounds abuse per replica, which is the point; a shared limit would need
Redis.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimit:
    """A bucket of ``capacity`` tokens refilled at ``per_second`` tokens each second."""

    capacity: int
    per_second: float

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.per_second <= 0:
            raise ValueError(
                f"rate limit needs capacity >= 1 and per_second > 0, got {self.capacity} and "
                f"{self.per_second}"
            )


class TokenBucketLimiter:
    """Per-key token buckets, for example one per device id or per client address.

    At most ``max_keys`` buckets are kept; beyond that the full ones (idle keys) are dropped, so
    a flood of distinct keys cannot exhaust memory.
    """

    def __init__(
        self,
        limit: RateLimit,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def _refill(self, key: str, now: float) -> float:
        tokens, updated = self._buckets.get(key, (float(self.limit.capacity), now))
        return min(float(self.limit.capacity), tokens + (now - updated) * self.limit.per_second)

    def try_acquire(self, key: str) -> float | None:
        """Take one token for ``key``; return None on success or the seconds until one is free."""
        with self._lock:
            now = self._clock()
            tokens = self._refill(key, now)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return (1 - tokens) / self.limit.per_second
            self._buckets[key] = (tokens - 1, now)
            self._trim(now)
            return None

    def retry_after(self, key: str) -> float | None:
        """Return the seconds until ``key`` has a token, or None if it has one now (takes none)."""
        # A key without a bucket has never taken a token, so its bucket would be full. Reading
        # the dict without the lock is safe: a membership test is atomic in CPython.
        if key not in self._buckets:
            return None
        with self._lock:
            tokens = self._refill(key, self._clock())
            return None if tokens >= 1 else (1 - tokens) / self.limit.per_second

    def _trim(self, now: float) -> None:
        if len(self._buckets) <= self._max_keys:
            return
        full = [key for key in self._buckets if self._refill(key, now) >= self.limit.capacity]
        for key in full:
            del self._buckets[key]
        # Still too many active keys: drop the oldest half rather than grow without bound.
        if len(self._buckets) > self._max_keys:
            ordered = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            for key in ordered[: len(ordered) // 2]:
                del self._buckets[key]
