"""Challenge parsing and the server clock."""

from __future__ import annotations

from typing import Any

import pytest

from device_sdk.auth import Challenge, ServerClock, b64url_encode
from device_sdk.errors import ProtocolError

NONCE = b64url_encode(b"\x07" * 32)


def challenge_json(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "nonce": NONCE,
        "device_id": "d" * 43,
        "audience": "https://verifier.test",
        "server_time": 1_796_414_400,
        "expires_at": 1_796_414_460,
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def test_challenge_parsed() -> None:
    challenge = Challenge.from_json(challenge_json())
    assert challenge == Challenge(
        NONCE, "d" * 43, "https://verifier.test", 1_796_414_400, 1_796_414_460
    )
    assert challenge.to_json() == challenge_json()


def test_unknown_fields_ignored() -> None:
    assert Challenge.from_json(challenge_json(extra="later")).nonce == NONCE


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"nonce": None}, "'nonce' must be a non-empty string"),
        ({"nonce": ""}, "'nonce' must be a non-empty string"),
        ({"nonce": 5}, "'nonce' must be a non-empty string"),
        ({"nonce": b64url_encode(b"\x07" * 31)}, "nonce shorter than 32 bytes"),
        ({"nonce": NONCE + "="}, "invalid base64url"),
        ({"device_id": None}, "'device_id' must be a non-empty string"),
        ({"audience": ["x"]}, "'audience' must be a non-empty string"),
        ({"server_time": "1796414400"}, "'server_time' must be a non-negative integer"),
        ({"server_time": True}, "'server_time' must be a non-negative integer"),
        ({"server_time": 1.5}, "'server_time' must be a non-negative integer"),
        ({"expires_at": None}, "'expires_at' must be a non-negative integer"),
        ({"expires_at": -1}, "'expires_at' must be a non-negative integer"),
        ({"expires_at": 1_796_414_400}, "lifetime of 0 s is outside 1..120 s"),
        ({"expires_at": 1_796_414_521}, "lifetime of 121 s is outside 1..120 s"),
    ],
)
def test_invalid_challenge_rejected(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        Challenge.from_json(challenge_json(**overrides))


def test_non_object_rejected() -> None:
    with pytest.raises(ProtocolError, match="expected a JSON object, got list"):
        Challenge.from_json([])  # type: ignore[arg-type]


def test_server_clock_follows_monotonic_time() -> None:
    ticks = iter([100.0, 100.4, 112.9])
    clock = ServerClock(1_796_414_400, monotonic=lambda: next(ticks))
    assert clock.now() == 1_796_414_400
    assert clock.now() == 1_796_414_412


def test_server_clock_from_challenge() -> None:
    challenge = Challenge.from_json(challenge_json())
    clock = ServerClock.from_challenge(challenge, monotonic=lambda: 5.0)
    assert clock.now() == challenge.server_time
