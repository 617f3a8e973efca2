"""Building assertions on the device side, with software keys."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fixtures_verifier import (
    ALGORITHMS,
    HTTP_CB,
    ISSUER,
    PLAIN_BROKER,
    TOKEN_URL,
    Device,
    decode_part,
    enroll,
    make_key,
)

from device_sdk.auth import (
    ASSERTION_TYPE,
    Challenge,
    ServerClock,
    algorithm_for_key,
    b64url_decode,
    b64url_encode,
    build_assertion,
    device_id_of,
)
from device_sdk.errors import ProtocolError
from device_sdk.verifier import Verifier, verify_signature

YEAR = 365 * 24 * 3600


def challenge_for(
    device_id: str, audience: str = ISSUER, server_time: int = 1_796_414_400
) -> Challenge:
    return Challenge(
        b64url_encode(b"\x05" * 32), device_id, audience, server_time, server_time + 60
    )


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_assertion_header_and_claims(algorithm: str) -> None:
    key = make_key(algorithm)
    device_id = device_id_of(key)
    challenge = challenge_for(device_id)
    clock = ServerClock(challenge.server_time, monotonic=lambda: 7.0, anchor=0.0)

    token = build_assertion(
        key, challenge, channel_binding=HTTP_CB, htm="POST", htu=TOKEN_URL, clock=clock
    )
    header_part, payload_part, signature_part = token.split(".")
    header = decode_part(header_part)
    claims = decode_part(payload_part)

    assert header == {"alg": algorithm, "typ": ASSERTION_TYPE, "kid": device_id}
    assert claims["iss"] == device_id
    assert claims["sub"] == device_id
    assert claims["aud"] == ISSUER
    assert claims["iat"] == challenge.server_time + 7
    assert claims["exp"] == challenge.server_time + 7 + 60
    assert claims["nonce"] == challenge.nonce
    assert b64url_decode(claims["cb"]) == HTTP_CB
    assert claims["htm"] == "POST"
    assert claims["htu"] == TOKEN_URL
    assert len(b64url_decode(claims["jti"])) == 16
    verify_signature(
        algorithm,
        key.public_key(),  # type: ignore[arg-type]
        f"{header_part}.{payload_part}".encode(),
        b64url_decode(signature_part),
    )


def test_jti_differs_each_time() -> None:
    key = make_key("ES256")
    challenge = challenge_for(device_id_of(key), PLAIN_BROKER)
    first = decode_part(build_assertion(key, challenge, channel_binding=None).split(".")[1])
    second = decode_part(build_assertion(key, challenge, channel_binding=None).split(".")[1])
    assert first["jti"] != second["jti"]


def test_plain_audience_has_no_cb_or_htm() -> None:
    key = make_key("ES256")
    token = build_assertion(
        key, challenge_for(device_id_of(key), PLAIN_BROKER), channel_binding=None
    )
    claims = decode_part(token.split(".")[1])
    assert "cb" not in claims
    assert "htm" not in claims
    assert "htu" not in claims


def test_shorter_lifetime() -> None:
    key = make_key("ES256")
    challenge = challenge_for(device_id_of(key), PLAIN_BROKER)
    claims = decode_part(
        build_assertion(key, challenge, channel_binding=None, lifetime=20).split(".")[1]
    )
    assert claims["exp"] - claims["iat"] == 20


@pytest.mark.parametrize("lifetime", [0, 61])
def test_lifetime_out_of_range_rejected(lifetime: int) -> None:
    key = make_key("ES256")
    challenge = challenge_for(device_id_of(key), PLAIN_BROKER)
    with pytest.raises(ProtocolError, match=f"lifetime {lifetime} s is outside 1..60 s"):
        build_assertion(key, challenge, channel_binding=None, lifetime=lifetime)


def test_tls_audience_needs_cb() -> None:
    key = make_key("ES256")
    with pytest.raises(ProtocolError, match="runs over TLS"):
        build_assertion(key, challenge_for(device_id_of(key)), channel_binding=None)


def test_plain_audience_refuses_cb() -> None:
    key = make_key("ES256")
    with pytest.raises(ProtocolError, match="is not a TLS URL"):
        build_assertion(
            key, challenge_for(device_id_of(key), PLAIN_BROKER), channel_binding=HTTP_CB
        )


def test_htm_without_htu_rejected() -> None:
    key = make_key("ES256")
    with pytest.raises(ProtocolError, match="htm and htu go together"):
        build_assertion(key, challenge_for(device_id_of(key)), channel_binding=HTTP_CB, htm="POST")


def test_challenge_of_other_device_refused() -> None:
    key = make_key("ES256")
    with pytest.raises(ProtocolError, match="was issued to device"):
        build_assertion(key, challenge_for("x" * 43, PLAIN_BROKER), channel_binding=None)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (ec.generate_private_key(ec.SECP521R1()), "curve secp521r1"),
        (ec.generate_private_key(ec.SECP256K1()), "curve secp256k1"),
        (rsa.generate_private_key(public_exponent=65537, key_size=1024), "RSA-1024"),
    ],
)
def test_unsupported_key_rejected(key: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        algorithm_for_key(key)  # type: ignore[arg-type]


def test_device_id_attribute_preferred() -> None:
    class KeyWithId:
        """Stands for a hardware key, which carries its own ``device_id``."""

        device_id = "hardware-id"

    assert device_id_of(KeyWithId()) == "hardware-id"  # type: ignore[arg-type]


def test_device_id_computed_from_public_key() -> None:
    key = make_key("ES256")
    assert device_id_of(key) == device_id_of(key)
    assert len(device_id_of(key)) == 43


def test_device_clock_years_off_still_logs_in(
    verifier: Verifier, device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The verifier reads its own clock; only the device's wall clock is years behind.
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 5 * YEAR)
    challenge = Challenge.from_json(verifier.issue_challenge(device.device_id, ISSUER, "192.0.2.1"))
    token = build_assertion(
        device.key, challenge, channel_binding=HTTP_CB, htm="POST", htu=TOKEN_URL
    )
    assert time.time() < challenge.server_time - 4 * YEAR
    verified = verifier.verify_assertion(token, audience_kind="http")
    assert verified.issued_at >= challenge.server_time
    assert verified.issued_at <= challenge.server_time + 1


def test_device_clock_years_ahead_still_logs_in(
    verifier: Verifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = enroll(verifier, "EdDSA")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3 * YEAR)
    challenge = Challenge.from_json(verifier.issue_challenge(device.device_id, ISSUER, "192.0.2.1"))
    token = build_assertion(
        device.key, challenge, channel_binding=HTTP_CB, htm="POST", htu=TOKEN_URL
    )
    assert verifier.verify_assertion(token, audience_kind="http").device_id == device.device_id
