"""The server challenge and the server clock a device derives from it."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from device_sdk.auth.encoding import b64url_decode
from device_sdk.errors import ProtocolError

NONCE_BYTES = 32
"""Random bytes in a challenge nonce (43 base64url characters)."""

MAX_CHALLENGE_LIFETIME = 120
"""Seconds a challenge may live at most, from ``server_time`` to ``expires_at``."""


def _require_str(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"invalid challenge: {name!r} must be a non-empty string")
    return value


def _require_int(data: Mapping[str, Any], name: str) -> int:
    value = data.get(name)
    # bool is an int subclass in Python, but true is not a time.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"invalid challenge: {name!r} must be a non-negative integer")
    return value


@dataclass(frozen=True)
class Challenge:
    """A single-use challenge, bound by the verifier to one device and one audience."""

    nonce: str
    device_id: str
    audience: str
    server_time: int
    expires_at: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Challenge:
        """Parse the verifier's challenge response.

        Every field must be present with its type; the nonce must decode to at least 32 bytes and
        the lifetime must lie between 1 and 120 seconds. Fields this version does not know are
        ignored, so a verifier may add some later.
        """
        if not isinstance(data, Mapping):
            raise ProtocolError(
                f"invalid challenge: expected a JSON object, got {type(data).__name__}"
            )
        nonce = _require_str(data, "nonce")
        device_id = _require_str(data, "device_id")
        audience = _require_str(data, "audience")
        server_time = _require_int(data, "server_time")
        expires_at = _require_int(data, "expires_at")

        if len(b64url_decode(nonce)) < NONCE_BYTES:
            raise ProtocolError(f"invalid challenge: nonce shorter than {NONCE_BYTES} bytes")
        lifetime = expires_at - server_time
        if not 0 < lifetime <= MAX_CHALLENGE_LIFETIME:
            raise ProtocolError(
                f"invalid challenge: lifetime of {lifetime} s "
                f"is outside 1..{MAX_CHALLENGE_LIFETIME} s"
            )
        return cls(nonce, device_id, audience, server_time, expires_at)

    def to_json(self) -> dict[str, Any]:
        """Return the challenge as the verifier sends it."""
        return {
            "nonce": self.nonce,
            "device_id": self.device_id,
            "audience": self.audience,
            "server_time": self.server_time,
            "expires_at": self.expires_at,
        }


@dataclass
class ServerClock:
    """The verifier's time as seen by a device: a server timestamp plus local monotonic time.

    A Raspberry Pi has no real-time clock and may boot years behind, so the device never reads
    its wall clock for ``iat`` and ``exp``. The error is the network delay of one request.
    """

    server_time: float
    monotonic: Callable[[], float] = time.monotonic
    anchor: float = field(default=-1.0)

    def __post_init__(self) -> None:
        if self.anchor < 0:
            self.anchor = self.monotonic()

    @classmethod
    def from_challenge(
        cls, challenge: Challenge, monotonic: Callable[[], float] = time.monotonic
    ) -> ServerClock:
        """Anchor a clock on the challenge's ``server_time``; call it when the challenge arrives."""
        return cls(float(challenge.server_time), monotonic)

    def now(self) -> int:
        """Return the current server time in integer Unix seconds."""
        return int(self.server_time + (self.monotonic() - self.anchor))
