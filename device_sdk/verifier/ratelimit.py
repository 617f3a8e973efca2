"""Token-bucket rate limits, in process memory or shared through Redis.

:class:`TokenBucketLimiter` counts in one process, so N verifier replicas behind a load balancer
would allow up to N times the configured rate. :class:`RedisTokenBucketLimiter` keeps the
buckets in Redis, so the replicas that share a Redis share the limits too. ``Verifier.open``
uses it whenever the challenges are in Redis.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import redis


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


class RateLimiter(Protocol):
    """Per-key token buckets; every method is safe to call from several threads."""

    def try_acquire(self, key: str) -> float | None:
        """Take one token for ``key``; return None on success or the seconds until one is free."""

    def retry_after(self, key: str) -> float | None:
        """Return the seconds until ``key`` has a token, or None if it has one now (takes none)."""


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


# Refills the bucket in KEYS[1], a hash of the tokens and the time they were counted, and takes
# one token if ARGV[3] is "1". The time is Redis's own, so replicas with skewed clocks agree.
# Returns the seconds until a token is free, as a string, or false when one was available.
# A bucket expires once it would be full again, so idle keys cost no memory.
_BUCKET_SCRIPT = """
local capacity = tonumber(ARGV[1])
local per_second = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = capacity
if state[1] then
    tokens = math.min(capacity, tonumber(state[1]) + (now - tonumber(state[2])) * per_second)
end
if tokens < 1 then
    return tostring((1 - tokens) / per_second)
end
if ARGV[3] == '1' then
    tokens = tokens - 1
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
    redis.call('EXPIRE', KEYS[1], math.ceil((capacity - tokens) / per_second) + 1)
end
return false
"""


class RedisTokenBucketLimiter:
    """Per-key token buckets in Redis, shared by every verifier that uses the same Redis.

    Each call is one Lua script, so concurrent takers in several processes never both take the
    last token. A key without a bucket has a full one. A failed or unreachable Redis raises
    :class:`~device_sdk.errors.StoreError` through ``errors``, as the challenge store does.
    """

    def __init__(
        self,
        client: redis.Redis,
        limit: RateLimit,
        *,
        name: str,
        prefix: str = "device-sdk:",
        errors: Callable[[], Any] | None = None,
    ) -> None:
        self.limit = limit
        self._prefix = f"{prefix}limit:{name}:"
        self._script = client.register_script(_BUCKET_SCRIPT)
        self._errors = errors

    def _run(self, key: str, take: bool) -> float | None:
        arguments: list[str | int] = [
            self.limit.capacity,
            repr(self.limit.per_second),
            "1" if take else "0",
        ]
        if self._errors is None:
            wait: Any = self._script(keys=[self._prefix + key], args=arguments)
        else:
            with self._errors():
                wait = self._script(keys=[self._prefix + key], args=arguments)
        return None if wait is None else float(wait)

    def try_acquire(self, key: str) -> float | None:
        """Take one token for ``key``; return None on success or the seconds until one is free."""
        return self._run(key, take=True)

    def retry_after(self, key: str) -> float | None:
        """Return the seconds until ``key`` has a token, or None if it has one now (takes none)."""
        return self._run(key, take=False)
