"""Exponential backoff with full jitter, for reconnects.

Full jitter draws each delay uniformly from zero up to an exponentially growing ceiling, so a
fleet of devices that lost their broker at the same moment spreads its reconnects over the whole
window instead of arriving in waves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from device_sdk.errors import ConfigError


@dataclass
class Backoff:
    """Delays for successive failed attempts: attempt ``n`` waits ``uniform(0, ceiling(n))``.

    ``ceiling(n) = min(cap, base * 2**n)`` in seconds. :meth:`reset` starts over after a success.
    Pass a seeded ``random.Random`` as ``rng`` for reproducible delays in tests.
    """

    base: float = 0.5
    cap: float = 60.0
    rng: random.Random = field(default_factory=random.SystemRandom)
    attempt: int = 0

    def __post_init__(self) -> None:
        if not self.base > 0:
            raise ConfigError(f"invalid backoff base {self.base!r} s: it must be greater than 0")
        if not self.cap >= self.base:
            raise ConfigError(
                f"invalid backoff cap {self.cap!r} s: it must be at least the base {self.base!r} s"
            )

    def ceiling(self, attempt: int) -> float:
        """Return the upper bound of the delay after failed attempt number ``attempt`` (from 0)."""
        # Cap the exponent so that a long outage never computes a huge float.
        exponent = min(attempt, 64)
        return float(min(self.cap, self.base * 2**exponent))

    def next_delay(self) -> float:
        """Return the delay before the next attempt and count one more failure."""
        delay = self.rng.uniform(0.0, self.ceiling(self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start over from the base delay, after a successful connection."""
        self.attempt = 0
