"""Every way an assertion is rejected, each its own case, with the reason code it must carry.

Each case runs on the in-memory challenge store and on the embedded SQLite one, set up as
``Verifier.open`` does (sharing the registry's database and checking device status there).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from fixtures_verifier import (
    BROKER_CB,
    HTTP_CB,
    HTTP_CB_ROTATED,
    ISSUER,
    NONCELESS_BROKER,
    PLAIN_BROKER,
    TLS_BROKER,
    TOKEN_URL,
    Device,
    ManualClock,
    encode_jws,
    enroll,
    http_assertion,
    make_csr,
    make_key,
    make_verifier,
    verifier_config,
)

from device_sdk.auth import (
    ASSERTION_TYPE,
    Challenge,
    ServerClock,
    b64url_decode,
    b64url_encode,
    build_assertion,
    device_id_of,
    mqtt_password_without_nonce,
)
from device_sdk.auth.assertion import new_jti, sign_assertion
from device_sdk.errors import VerificationError
from device_sdk.verifier import (
    SQLiteChallengeStore,
    SQLiteDeviceRegistry,
    Verifier,
    verify_signature,
)

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.fixture(params=["memory", "sqlite"])
def verifier(
    request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock
) -> Iterator[Verifier]:
    if request.param == "memory":
        instance = make_verifier(tmp_path, clock)
    else:
        registry = SQLiteDeviceRegistry(tmp_path / "verifier.db")
        instance = Verifier(
            verifier_config(),
            registry=registry,
            challenges=SQLiteChallengeStore(registry.connections, clock, check_device_status=True),
            clock=clock,
        )
    yield instance
    instance.close()


def reject(verifier: Verifier, token: str, kind: str = "http", **kwargs: Any) -> VerificationError:
    with pytest.raises(VerificationError) as caught:
        verifier.verify_assertion(token, audience_kind=kind, client_address="192.0.2.1", **kwargs)  # type: ignore[arg-type]
    return caught.value


def challenge_for(verifier: Verifier, device_id: str, audience: str = ISSUER) -> Challenge:
    return Challenge.from_json(verifier.issue_challenge(device_id, audience, "192.0.2.1"))


def claims_for(device_id: str, challenge: Challenge, **overrides: Any) -> dict[str, Any]:
    """Return the claims an honest device would sign for an HTTP login, with overrides."""
    now = challenge.server_time
    claims: dict[str, Any] = {
        "iss": device_id,
        "sub": device_id,
        "aud": challenge.audience,
        "iat": now,
        "exp": now + 60,
        "jti": new_jti(),
        "nonce": challenge.nonce,
        "cb": b64url_encode(HTTP_CB),
        "htm": "POST",
        "htu": TOKEN_URL,
    }
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not None}


def split(token: str) -> tuple[str, str, bytes]:
    header, payload, signature = token.split(".")
    return header, payload, b64url_decode(signature)


def with_signature(token: str, signature: bytes) -> str:
    header, payload, _ = split(token)
    return f"{header}.{payload}.{b64url_encode(signature)}"


def test_valid_assertion_accepted(verifier: Verifier, device: Device) -> None:
    verified = verifier.verify_assertion(
        http_assertion(verifier, device), audience_kind="http", client_address="192.0.2.1"
    )
    assert verified.device_id == device.device_id
    assert verified.audience == ISSUER
    assert verified.algorithm == "ES256"


# Replays


def test_sequential_replay_rejected(verifier: Verifier, device: Device) -> None:
    token = http_assertion(verifier, device)
    verifier.verify_assertion(token, audience_kind="http")
    assert reject(verifier, token).reason == "replayed"


def test_malleated_signature_replay_rejected(verifier: Verifier, device: Device) -> None:
    token = http_assertion(verifier, device)
    verifier.verify_assertion(token, audience_kind="http")

    header, payload, signature = split(token)
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    malleated = r.to_bytes(32, "big") + (P256_ORDER - s).to_bytes(32, "big")
    assert malleated != signature
    # (r, n-s) is a valid signature too, so only the spent nonce stops it.
    verify_signature("ES256", device.key.public_key(), f"{header}.{payload}".encode(), malleated)  # type: ignore[arg-type]

    assert reject(verifier, with_signature(token, malleated)).reason == "replayed"


def test_unknown_nonce_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    claims = claims_for(device.device_id, challenge, nonce=b64url_encode(b"\x00" * 32))
    token = sign_assertion(device.key, claims, device_id=device.device_id)
    assert reject(verifier, token).reason == "unknown_nonce"


def test_missing_nonce_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    claims = claims_for(device.device_id, challenge)
    del claims["nonce"]
    token = sign_assertion(device.key, claims, device_id=device.device_id)
    assert reject(verifier, token).reason == "unknown_nonce"


# Challenge binding


def test_expired_challenge_rejected(verifier: Verifier, device: Device, clock: ManualClock) -> None:
    challenge = challenge_for(verifier, device.device_id)
    clock.advance(90)
    # The device's server clock has moved on as well, so iat and exp are fresh.
    device_clock = ServerClock(challenge.server_time, monotonic=lambda: 90.0, anchor=0.0)
    token = build_assertion(
        device.key,
        challenge,
        channel_binding=HTTP_CB,
        htm="POST",
        htu=TOKEN_URL,
        clock=device_clock,
    )
    error = reject(verifier, token)
    assert error.reason == "challenge_expired"
    assert error.detail == "challenge expired 30 s ago"


def test_challenge_of_another_device_rejected(verifier: Verifier, device: Device) -> None:
    other = enroll(verifier)
    challenge = challenge_for(verifier, device.device_id)
    token = sign_assertion(
        other.key, claims_for(other.device_id, challenge), device_id=other.device_id
    )
    assert reject(verifier, token).reason == "wrong_device"

    # The other device's attempt left the challenge usable by the device it was issued to.
    own = sign_assertion(
        device.key, claims_for(device.device_id, challenge), device_id=device.device_id
    )
    assert verifier.verify_assertion(own, audience_kind="http").nonce == challenge.nonce


def test_challenge_for_another_audience_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id, PLAIN_BROKER)
    claims = claims_for(device.device_id, challenge, aud=ISSUER)
    token = sign_assertion(device.key, claims, device_id=device.device_id)
    assert reject(verifier, token).reason == "wrong_audience"
    assert verifier.challenges.find(challenge.nonce) == (challenge, False)


# Audience


def test_wrong_aud_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    claims = claims_for(device.device_id, challenge, aud="https://elsewhere.test")
    token = sign_assertion(device.key, claims, device_id=device.device_id)
    assert reject(verifier, token).reason == "wrong_audience"


def test_broker_assertion_at_token_endpoint_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id, PLAIN_BROKER)
    token = build_assertion(device.key, challenge, channel_binding=None)
    assert reject(verifier, token, "http").reason == "wrong_audience"


def test_http_assertion_at_broker_rejected(verifier: Verifier, device: Device) -> None:
    assert reject(verifier, http_assertion(verifier, device), "mqtt").reason == "wrong_audience"


def test_wrong_htu_rejected(verifier: Verifier, device: Device) -> None:
    token = http_assertion(verifier, device, htu="https://verifier.test/v1/other")
    assert reject(verifier, token).reason == "wrong_audience"


def test_missing_htm_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    claims = claims_for(device.device_id, challenge, htm=None, htu=None)
    token = sign_assertion(device.key, claims, device_id=device.device_id)
    assert reject(verifier, token).reason == "malformed"


def test_mqtt_username_mismatch_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id, PLAIN_BROKER)
    token = build_assertion(device.key, challenge, channel_binding=None)
    error = reject(verifier, token, "mqtt", expected_device_id="A" * 43)
    assert error.reason == "wrong_device"


# Time


def test_exp_passed_rejected(verifier: Verifier, device: Device, clock: ManualClock) -> None:
    token = http_assertion(verifier, device)
    clock.advance(60 + 30 + 5)
    error = reject(verifier, token)
    assert error.reason == "expired"
    assert error.detail == "exp passed 35 s ago (leeway 30 s)"


def test_iat_in_future_rejected_with_skew(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    ahead = ServerClock(challenge.server_time + 100, monotonic=lambda: 0.0, anchor=0.0)
    token = build_assertion(
        device.key, challenge, channel_binding=HTTP_CB, htm="POST", htu=TOKEN_URL, clock=ahead
    )
    error = reject(verifier, token)
    assert error.reason == "iat_in_future"
    assert error.detail == "iat is 100 s ahead of the verifier clock (leeway 30 s)"


def test_iat_in_future_within_leeway_accepted(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    ahead = ServerClock(challenge.server_time + 25, monotonic=lambda: 0.0, anchor=0.0)
    token = build_assertion(
        device.key, challenge, channel_binding=HTTP_CB, htm="POST", htu=TOKEN_URL, clock=ahead
    )
    assert verifier.verify_assertion(token, audience_kind="http").issued_at == (
        challenge.server_time + 25
    )


def test_lifetime_over_60_s_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    claims = claims_for(device.device_id, challenge, exp=challenge.server_time + 61)
    token = sign_assertion(device.key, claims, device_id=device.device_id)
    assert reject(verifier, token).reason == "lifetime_too_long"


def test_exp_before_iat_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    claims = claims_for(device.device_id, challenge, exp=challenge.server_time - 1)
    token = sign_assertion(device.key, claims, device_id=device.device_id)
    assert reject(verifier, token).reason == "malformed"


def test_boolean_iat_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    claims = claims_for(device.device_id, challenge, iat=True)
    token = sign_assertion(device.key, claims, device_id=device.device_id)
    assert reject(verifier, token).reason == "malformed"


# Channel binding


def test_wrong_cb_rejected(verifier: Verifier, device: Device) -> None:
    token = http_assertion(verifier, device, channel_binding=b"\x99" * 32)
    assert reject(verifier, token).reason == "channel_binding_mismatch"


def test_missing_cb_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    claims = claims_for(device.device_id, challenge, cb=None)
    token = sign_assertion(device.key, claims, device_id=device.device_id)
    assert reject(verifier, token).reason == "missing_channel_binding"


def test_rotated_certificate_cb_accepted(verifier: Verifier, device: Device) -> None:
    token = http_assertion(verifier, device, channel_binding=HTTP_CB_ROTATED)
    assert verifier.verify_assertion(token, audience_kind="http").device_id == device.device_id


def test_broker_cb_accepted(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id, TLS_BROKER)
    token = build_assertion(device.key, challenge, channel_binding=BROKER_CB)
    assert verifier.verify_assertion(token, audience_kind="mqtt").audience == TLS_BROKER


def test_http_cb_at_broker_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id, TLS_BROKER)
    token = build_assertion(device.key, challenge, channel_binding=HTTP_CB)
    assert reject(verifier, token, "mqtt").reason == "channel_binding_mismatch"


def test_cb_on_plain_broker_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id, PLAIN_BROKER)
    claims = claims_for(device.device_id, challenge, htm=None, htu=None)
    token = sign_assertion(device.key, claims, device_id=device.device_id)
    assert reject(verifier, token, "mqtt").reason == "channel_binding_mismatch"


# Devices


def test_unknown_device_gets_no_challenge(verifier: Verifier) -> None:
    stranger = device_id_of(make_key("ES256"))
    with pytest.raises(VerificationError) as caught:
        verifier.issue_challenge(stranger, ISSUER, "192.0.2.1")
    assert caught.value.reason == "unknown_device"


def test_unknown_device_assertion_rejected(verifier: Verifier, device: Device) -> None:
    stranger = make_key("ES256")
    stranger_id = device_id_of(stranger)
    challenge = challenge_for(verifier, device.device_id)
    token = sign_assertion(stranger, claims_for(stranger_id, challenge), device_id=stranger_id)
    assert reject(verifier, token).reason == "unknown_device"


def test_revoked_device_assertion_rejected(verifier: Verifier, device: Device) -> None:
    token = http_assertion(verifier, device)
    verifier.revoke(device.device_id)
    assert reject(verifier, token).reason == "revoked_device"


def test_revoked_device_gets_no_challenge(verifier: Verifier, device: Device) -> None:
    verifier.revoke(device.device_id)
    with pytest.raises(VerificationError) as caught:
        verifier.issue_challenge(device.device_id, ISSUER, "192.0.2.1")
    assert caught.value.reason == "revoked_device"


def test_revocation_purges_challenges(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    verifier.revoke(device.device_id)
    assert verifier.challenges.find(challenge.nonce) is None


def test_swapped_kid_with_other_key_rejected(verifier: Verifier, device: Device) -> None:
    attacker = enroll(verifier)
    challenge = challenge_for(verifier, device.device_id)
    # The attacker claims to be the victim but can only sign with its own key.
    token = sign_assertion(
        attacker.key, claims_for(device.device_id, challenge), device_id=device.device_id
    )
    assert reject(verifier, token).reason == "bad_signature"


def test_iss_differs_from_kid_rejected(verifier: Verifier, device: Device) -> None:
    other = enroll(verifier)
    challenge = challenge_for(verifier, device.device_id)
    claims = claims_for(device.device_id, challenge, iss=other.device_id)
    token = sign_assertion(device.key, claims, device_id=device.device_id)
    assert reject(verifier, token).reason == "wrong_device"


# Algorithms and header


def test_alg_none_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    header = {"typ": ASSERTION_TYPE, "alg": "none", "kid": device.device_id}
    token = encode_jws(header, claims_for(device.device_id, challenge), b"")
    assert reject(verifier, token).reason == "unsupported_algorithm"


def test_hs256_keyed_with_public_key_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    public_pem = device.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"typ": ASSERTION_TYPE, "alg": "HS256", "kid": device.device_id}
    unsigned = encode_jws(header, claims_for(device.device_id, challenge), b"").rsplit(".", 1)[0]
    mac = hmac.new(public_pem, unsigned.encode(), hashlib.sha256).digest()
    assert reject(verifier, f"{unsigned}.{b64url_encode(mac)}").reason == "unsupported_algorithm"


def test_unlisted_alg_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    header = {"typ": ASSERTION_TYPE, "alg": "RS256", "kid": device.device_id}
    token = encode_jws(header, claims_for(device.device_id, challenge), b"\x01" * 256)
    assert reject(verifier, token).reason == "unsupported_algorithm"


def test_alg_other_than_enrolled_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    header = {"typ": ASSERTION_TYPE, "alg": "ES384", "kid": device.device_id}
    token = encode_jws(header, claims_for(device.device_id, challenge), b"\x01" * 96)
    assert reject(verifier, token).reason == "algorithm_mismatch"


def test_typ_jwt_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    token = jwt.encode(
        claims_for(device.device_id, challenge),
        device.key,  # type: ignore[arg-type]
        algorithm="ES256",
        headers={"typ": "JWT", "kid": device.device_id},
    )
    assert reject(verifier, token).reason == "bad_type"


def test_access_token_as_assertion_rejected(verifier: Verifier, device: Device) -> None:
    verified = verifier.verify_assertion(http_assertion(verifier, device), audience_kind="http")
    access_token = verifier.issue_access_token(verified)["access_token"]
    assert reject(verifier, access_token).reason == "bad_type"


def test_header_jwk_ignored(verifier: Verifier, device: Device) -> None:
    attacker = ec.generate_private_key(ec.SECP256R1())
    challenge = challenge_for(verifier, device.device_id)
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(attacker.public_key()))
    token = jwt.encode(
        claims_for(device.device_id, challenge),
        attacker,
        algorithm="ES256",
        headers={"typ": ASSERTION_TYPE, "kid": device.device_id, "jwk": jwk, "jku": "https://x"},
    )
    assert reject(verifier, token).reason == "bad_signature"


def test_crit_header_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    token = jwt.encode(
        claims_for(device.device_id, challenge),
        device.key,  # type: ignore[arg-type]
        algorithm="ES256",
        headers={"typ": ASSERTION_TYPE, "kid": device.device_id, "crit": ["exp"]},
    )
    assert reject(verifier, token).reason == "malformed"


# Signature encodings


def test_der_signature_where_raw_is_due_rejected(verifier: Verifier, device: Device) -> None:
    token = http_assertion(verifier, device)
    header, payload, _ = split(token)
    der = device.key.sign(f"{header}.{payload}".encode(), ec.ECDSA(ec.hashes.SHA256()))  # type: ignore[call-arg, arg-type]
    decode_dss_signature(der)
    assert reject(verifier, with_signature(token, der)).reason == "bad_signature"


def test_raw_signature_of_wrong_width_rejected(verifier: Verifier, device: Device) -> None:
    token = http_assertion(verifier, device)
    _, _, signature = split(token)
    r, s = signature[:32], signature[32:]
    # r and s padded to the P-384 width: the same integers, the wrong encoding.
    wide = b"\x00" * 16 + r + b"\x00" * 16 + s
    assert reject(verifier, with_signature(token, wide)).reason == "bad_signature"


def test_truncated_signature_rejected(verifier: Verifier, device: Device) -> None:
    token = http_assertion(verifier, device)
    _, _, signature = split(token)
    assert reject(verifier, with_signature(token, signature[:-1])).reason == "bad_signature"


def test_empty_signature_rejected(verifier: Verifier, device: Device) -> None:
    token = http_assertion(verifier, device)
    assert reject(verifier, with_signature(token, b"")).reason == "bad_signature"


def test_zero_signature_rejected(verifier: Verifier, device: Device) -> None:
    token = http_assertion(verifier, device)
    assert reject(verifier, with_signature(token, b"\x00" * 64)).reason == "bad_signature"


def test_failed_signature_keeps_challenge(verifier: Verifier, device: Device) -> None:
    token = http_assertion(verifier, device)
    _, _, signature = split(token)
    flipped = signature[:-1] + bytes([signature[-1] ^ 1])
    assert reject(verifier, with_signature(token, flipped)).reason == "bad_signature"
    # A forged assertion must not spend the device's challenge.
    assert verifier.verify_assertion(token, audience_kind="http").device_id == device.device_id


@pytest.mark.parametrize("algorithm", ["ES384", "EdDSA", "PS256"])
def test_other_algorithms_accepted(verifier: Verifier, algorithm: str) -> None:
    device = enroll(verifier, algorithm)
    verified = verifier.verify_assertion(http_assertion(verifier, device), audience_kind="http")
    assert verified.algorithm == algorithm


def test_rsa_3072_accepted(verifier: Verifier) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    record, _ = verifier.enroll(make_csr(key), verifier.create_enrollment_tokens()[0], "sw", False)
    device = Device(key, record.device_id, record.algorithm)
    token = http_assertion(verifier, device)
    assert len(split(token)[2]) == 384
    assert verifier.verify_assertion(token, audience_kind="http").algorithm == "PS256"


@pytest.mark.parametrize("algorithm", ["ES384", "EdDSA", "PS256"])
def test_other_algorithms_truncated_rejected(verifier: Verifier, algorithm: str) -> None:
    device = enroll(verifier, algorithm)
    token = http_assertion(verifier, device)
    _, _, signature = split(token)
    assert reject(verifier, with_signature(token, signature[:-1])).reason == "bad_signature"


# Encoding


def test_padded_base64url_rejected(verifier: Verifier, device: Device) -> None:
    header, payload, signature = http_assertion(verifier, device).split(".")
    token = f"{header}.{payload}.{signature}="
    assert reject(verifier, token).reason == "malformed"


def test_standard_base64_alphabet_rejected(verifier: Verifier, device: Device) -> None:
    token = http_assertion(verifier, device)
    header, payload, signature = token.split(".")
    swapped = signature.replace("-", "+").replace("_", "/")
    if swapped == signature:
        swapped = signature[:-1] + "+"
    assert reject(verifier, f"{header}.{payload}.{swapped}").reason == "malformed"


def test_noncanonical_trailing_bits_rejected(verifier: Verifier, device: Device) -> None:
    header, payload, signature = http_assertion(verifier, device).split(".")
    # 64 bytes encode to 86 characters whose last one carries 4 unused bits.
    assert len(signature) == 86
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    assert last % 16 == 0
    tweaked = signature[:-1] + alphabet[last | 1]
    assert reject(verifier, f"{header}.{payload}.{tweaked}").reason == "malformed"


def test_duplicate_json_keys_rejected(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id)
    claims = claims_for(device.device_id, challenge)
    body = json.dumps(claims)[:-1] + ', "aud": "https://elsewhere.test"}'
    header = {"typ": ASSERTION_TYPE, "alg": "ES256", "kid": device.device_id}
    header_part = b64url_encode(json.dumps(header).encode())
    payload_part = b64url_encode(body.encode())
    raw = device.key.sign(f"{header_part}.{payload_part}".encode(), ec.ECDSA(ec.hashes.SHA256()))  # type: ignore[call-arg, arg-type]
    r, s = decode_dss_signature(raw)
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    token = f"{header_part}.{payload_part}.{b64url_encode(signature)}"
    error = reject(verifier, token)
    assert error.reason == "malformed"
    assert "duplicate key 'aud'" in error.detail


def test_one_megabyte_assertion_rejected_fast(verifier: Verifier, device: Device) -> None:
    token = http_assertion(verifier, device)
    header, payload, signature = token.split(".")
    huge = f"{header}.{payload}{'A' * (1 << 20)}.{signature}"
    started = time.perf_counter()
    error = reject(verifier, huge)
    assert error.reason == "malformed"
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize(
    "token",
    ["", "a", "a.b", "a.b.c.d", "..", "e30.e30.", "W10.e30.", "e30.W10.", "\u00e9.e30.e30"],
)
def test_garbage_rejected_as_malformed(verifier: Verifier, token: str) -> None:
    assert reject(verifier, token).reason == "malformed"


# Assertions without a nonce (the weaker, time-based mode)


def test_nonceless_assertion_accepted_once(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id, NONCELESS_BROKER)
    clock = ServerClock.from_challenge(challenge)
    token = mqtt_password_without_nonce(device.key, NONCELESS_BROKER, None, clock=clock)
    verified = verifier.verify_assertion(token, audience_kind="mqtt")
    assert verified.nonce is None
    assert reject(verifier, token, "mqtt").reason == "replayed"


def test_nonceless_assertion_needs_allowed_audience(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id, PLAIN_BROKER)
    clock = ServerClock.from_challenge(challenge)
    token = mqtt_password_without_nonce(device.key, PLAIN_BROKER, None, clock=clock)
    assert reject(verifier, token, "mqtt").reason == "unknown_nonce"


def test_nonceless_assertion_lifetime_capped(verifier: Verifier, device: Device) -> None:
    challenge = challenge_for(verifier, device.device_id, NONCELESS_BROKER)
    claims = claims_for(device.device_id, challenge, nonce=None, htm=None, htu=None, cb=None)
    claims["exp"] = claims["iat"] + 45
    token = sign_assertion(device.key, claims, device_id=device.device_id)
    assert reject(verifier, token, "mqtt").reason == "lifetime_too_long"


# Audit log


def test_rejection_audit_line(
    verifier: Verifier, device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    token = http_assertion(verifier, device)
    verifier.verify_assertion(token, audience_kind="http")
    with caplog.at_level(logging.INFO, logger="device_sdk.verifier.audit"):
        reject(verifier, token)
    records = [r for r in caplog.records if r.name == "device_sdk.verifier.audit"]
    assert len(records) == 1
    line = records[0].getMessage()
    assert "outcome=reject" in line
    assert "reason=replayed" in line
    assert f"device_id={device.device_id}" in line
    assert "client=192.0.2.1" in line
    assert records[0].audit["reason"] == "replayed"  # type: ignore[attr-defined]
    assert token not in caplog.text
    assert token.split(".")[2] not in caplog.text


def test_acceptance_audit_line(
    verifier: Verifier, device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    token = http_assertion(verifier, device)
    with caplog.at_level(logging.INFO, logger="device_sdk.verifier.audit"):
        verifier.verify_assertion(token, audience_kind="http", client_address="198.51.100.7")
    lines = [r.getMessage() for r in caplog.records if r.name == "device_sdk.verifier.audit"]
    assert lines == [
        f"event=assertion outcome=accept device_id={device.device_id} client=198.51.100.7 "
        f"kind=http jti={json.loads(b64url_decode(token.split('.')[1]))['jti']}"
    ]
