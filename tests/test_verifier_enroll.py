"""Enrollment, device management, access tokens, JWKS, rate limits and configuration."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fixtures_verifier import (
    BROKER_CB,
    ISSUER,
    PLAIN_BROKER,
    REGISTRY_KINDS,
    Device,
    ManualClock,
    enroll,
    http_assertion,
    make_csr,
    make_key,
    make_verifier,
    verifier_config,
)

from device_sdk.auth import device_id_of
from device_sdk.errors import ConfigError, VerificationError
from device_sdk.verifier import RateLimit, TokenBucketLimiter, Verifier, hash_enrollment_token
from device_sdk.verifier.tokens import load_or_create_signing_key


@pytest.fixture(params=REGISTRY_KINDS)
def registry_kind(request: pytest.FixtureRequest) -> str:
    """Run every test that uses the ``verifier`` fixture on SQLite and on PostgreSQL."""
    kind: str = request.param
    return kind


def reason_of(call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(VerificationError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value.reason


# Enrollment


@pytest.mark.parametrize("algorithm", ["ES256", "ES384", "EdDSA", "PS256"])
def test_enroll_creates_record(verifier: Verifier, algorithm: str) -> None:
    key = make_key(algorithm)
    token = verifier.create_enrollment_tokens()[0]
    record, created = verifier.enroll(make_csr(key), token, "pkcs11", True, "192.0.2.9")
    assert created
    assert record.device_id == device_id_of(key)
    assert record.algorithm == algorithm
    assert record.status == "active"
    assert record.backend == "pkcs11"
    assert record.hardware_backed is True
    assert verifier.get_device(record.device_id) == record
    assert set(record.to_json()) == {
        "device_id",
        "algorithm",
        "public_key_pem",
        "status",
        "backend",
        "hardware_backed",
        "enrolled_at",
        "revoked_at",
        "attested",
    }
    assert record.attested is False


def test_enroll_again_same_key_returns_record(verifier: Verifier) -> None:
    key = make_key("ES256")
    token = verifier.create_enrollment_tokens()[0]
    first, created = verifier.enroll(make_csr(key), token, "software", False)
    again, created_again = verifier.enroll(make_csr(key), token, "software", False)
    assert created
    assert not created_again
    assert again == first
    assert len(verifier.list_devices()) == 1


def test_enrollment_token_used_by_other_key(verifier: Verifier) -> None:
    token = verifier.create_enrollment_tokens()[0]
    verifier.enroll(make_csr(make_key("ES256")), token, "software", False)
    reason = reason_of(verifier.enroll, make_csr(make_key("ES256")), token, "software", False)
    assert reason == "enrollment_token_used"


def test_unknown_enrollment_token(verifier: Verifier) -> None:
    reason = reason_of(verifier.enroll, make_csr(make_key("ES256")), "made-up", "software", False)
    assert reason == "enrollment_token_invalid"


def test_expired_enrollment_token(verifier: Verifier, clock: ManualClock) -> None:
    token = verifier.create_enrollment_tokens(lifetime=60)[0]
    clock.advance(61)
    reason = reason_of(verifier.enroll, make_csr(make_key("ES256")), token, "software", False)
    assert reason == "enrollment_token_invalid"


def test_enrollment_token_stored_as_hash(tmp_path: Path, clock: ManualClock) -> None:
    # SQLite only: test_verifier_postgres.py checks the PostgreSQL table.
    verifier = make_verifier(tmp_path, clock)
    token = verifier.create_enrollment_tokens(never_expire=True)[0]
    verifier.close()
    # The write-ahead log contains the newest pages, so read it as well as the main file.
    database = b"".join(path.read_bytes() for path in tmp_path.glob("registry.db*"))
    assert token.encode() not in database
    assert hash_enrollment_token(token).encode() in database


def test_enrollment_tokens_distinct(verifier: Verifier) -> None:
    tokens = verifier.create_enrollment_tokens(5)
    assert len(set(tokens)) == 5
    assert all(len(token) == 43 for token in tokens)


def test_csr_with_bad_signature(verifier: Verifier) -> None:
    key = make_key("ES256")
    other = make_key("ES256")
    # Claims key's public key but is signed by another key.
    csr = make_csr(key)
    forged = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(other, hashes.SHA256())  # type: ignore[arg-type]
    )
    good = x509.load_pem_x509_csr(csr)
    tampered = forged.public_bytes(serialization.Encoding.DER).replace(
        other.public_key().public_bytes(  # type: ignore[union-attr]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        good.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    pem = x509.load_der_x509_csr(tampered).public_bytes(serialization.Encoding.PEM)
    token = verifier.create_enrollment_tokens()[0]
    assert reason_of(verifier.enroll, pem, token, "software", False) == "bad_csr"
    # The token was not spent by the failed attempt.
    assert verifier.enroll(csr, token, "software", False)[1]


@pytest.mark.parametrize(
    ("csr", "backend", "hardware_backed"),
    [
        (b"not a csr", "software", False),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "x",
            False,
        ),
        (b"A" * 20000, "software", False),
        (None, "software", False),
        ("valid", "Bad Backend!", False),
        ("valid", "", False),
        ("valid", "software", "yes"),
    ],
)
def test_invalid_enrollment_input(
    verifier: Verifier, csr: object, backend: str, hardware_backed: object
) -> None:
    if csr == "valid":
        csr = make_csr(make_key("ES256"))
    token = verifier.create_enrollment_tokens()[0]
    assert reason_of(verifier.enroll, csr, token, backend, hardware_backed) == "bad_csr"


def test_csr_with_unsupported_curve(verifier: Verifier) -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    token = verifier.create_enrollment_tokens()[0]
    assert reason_of(verifier.enroll, csr, token, "software", False) == "unsupported_algorithm"


def test_revoked_device_cannot_reenroll(verifier: Verifier) -> None:
    key = make_key("ES256")
    record, _ = verifier.enroll(make_csr(key), verifier.create_enrollment_tokens()[0], "sw", False)
    verifier.revoke(record.device_id)
    token = verifier.create_enrollment_tokens()[0]
    assert reason_of(verifier.enroll, make_csr(key), token, "sw", False) == "revoked_device"


def test_revoke_unknown_device(verifier: Verifier) -> None:
    assert reason_of(verifier.revoke, "x" * 43) == "unknown_device"


def test_revoke_sets_status(verifier: Verifier, device: Device, clock: ManualClock) -> None:
    record = verifier.revoke(device.device_id)
    assert record.status == "revoked"
    assert record.revoked_at == int(clock.now)
    assert [r.status for r in verifier.list_devices()] == ["revoked"]


# Challenges


def test_challenge_answer(verifier: Verifier, device: Device, clock: ManualClock) -> None:
    answer = verifier.issue_challenge(device.device_id, ISSUER, "192.0.2.1")
    assert set(answer) == {"nonce", "device_id", "audience", "server_time", "expires_at"}
    assert len(answer["nonce"]) == 43
    assert answer["server_time"] == int(clock.now)
    assert answer["expires_at"] == int(clock.now) + 60


def test_challenge_for_unserved_audience(verifier: Verifier, device: Device) -> None:
    reason = reason_of(
        verifier.issue_challenge, device.device_id, "https://other.test", "192.0.2.1"
    )
    assert reason == "wrong_audience"


@pytest.mark.parametrize("device_id", ["short", "x" * 44, "a" * 42 + "=", 7, None])
def test_challenge_for_malformed_device_id(verifier: Verifier, device_id: object) -> None:
    assert reason_of(verifier.issue_challenge, device_id, ISSUER, "192.0.2.1") == "malformed"


# Rate limits


def test_challenge_rate_limit_per_device(tmp_path: Path, clock: ManualClock) -> None:
    verifier = make_verifier(
        tmp_path, clock, challenge_limit_per_device=RateLimit(capacity=3, per_second=0.5)
    )
    device = enroll(verifier)
    for _ in range(3):
        verifier.issue_challenge(device.device_id, ISSUER, "192.0.2.1")
    with pytest.raises(VerificationError) as caught:
        verifier.issue_challenge(device.device_id, ISSUER, "192.0.2.1")
    assert caught.value.reason == "rate_limited"
    assert caught.value.retry_after is not None
    assert 0 < caught.value.retry_after <= 2.0


def test_challenge_rate_limit_per_address(tmp_path: Path, clock: ManualClock) -> None:
    verifier = make_verifier(
        tmp_path, clock, challenge_limit_per_address=RateLimit(capacity=2, per_second=0.01)
    )
    devices = [enroll(verifier) for _ in range(3)]
    verifier.issue_challenge(devices[0].device_id, ISSUER, "198.51.100.1")
    verifier.issue_challenge(devices[1].device_id, ISSUER, "198.51.100.1")
    reason = reason_of(verifier.issue_challenge, devices[2].device_id, ISSUER, "198.51.100.1")
    assert reason == "rate_limited"
    verifier.issue_challenge(devices[2].device_id, ISSUER, "198.51.100.2")


def test_failure_rate_limit_per_device(tmp_path: Path, clock: ManualClock) -> None:
    verifier = make_verifier(
        tmp_path, clock, failure_limit_per_device=RateLimit(capacity=2, per_second=0.001)
    )
    device = enroll(verifier)
    for _ in range(2):
        token = http_assertion(verifier, device, channel_binding=b"\x00" * 32)
        reason = reason_of(verifier.verify_assertion, token, audience_kind="http")
        assert reason == "channel_binding_mismatch"
    # Even a correct assertion now waits until the failure budget refills.
    token = http_assertion(verifier, device)
    assert reason_of(verifier.verify_assertion, token, audience_kind="http") == "rate_limited"


def test_token_bucket_refills() -> None:
    now = [0.0]
    limiter = TokenBucketLimiter(RateLimit(capacity=2, per_second=1.0), clock=lambda: now[0])
    assert limiter.try_acquire("a") is None
    assert limiter.try_acquire("a") is None
    assert limiter.try_acquire("a") == pytest.approx(1.0)
    assert limiter.try_acquire("b") is None
    now[0] = 0.5
    assert limiter.retry_after("a") == pytest.approx(0.5)
    now[0] = 1.0
    assert limiter.try_acquire("a") is None


def test_token_bucket_bounded_keys() -> None:
    now = [0.0]
    limiter = TokenBucketLimiter(
        RateLimit(capacity=1, per_second=0.001), max_keys=100, clock=lambda: now[0]
    )
    for number in range(1000):
        limiter.try_acquire(f"key-{number}")
    assert len(limiter._buckets) <= 100


@pytest.mark.parametrize(("capacity", "per_second"), [(0, 1.0), (1, 0.0)])
def test_rate_limit_validated(capacity: int, per_second: float) -> None:
    with pytest.raises(ValueError, match="rate limit needs"):
        RateLimit(capacity, per_second)


# Access tokens and JWKS


def test_access_token_claims(verifier: Verifier, device: Device, clock: ManualClock) -> None:
    verified = verifier.verify_assertion(http_assertion(verifier, device), audience_kind="http")
    answer = verifier.issue_access_token(verified)
    assert answer["token_type"] == "Bearer"
    assert answer["expires_in"] == 300

    token = answer["access_token"]
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "typ": "at+jwt", "kid": verifier.jwks()["keys"][0]["kid"]}
    jwks = jwt.PyJWKSet.from_dict(verifier.jwks())
    claims = jwt.decode(
        token,
        jwks.keys[0].key,
        algorithms=["ES256"],
        audience=ISSUER,
        issuer=ISSUER,
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["sub"] == device.device_id
    assert claims["iat"] == int(clock.now)
    assert claims["exp"] == int(clock.now) + 300
    assert len(claims["jti"]) == 22


def test_access_token_verified(verifier: Verifier, device: Device) -> None:
    verified = verifier.verify_assertion(http_assertion(verifier, device), audience_kind="http")
    token = verifier.issue_access_token(verified)["access_token"]
    assert verifier.verify_access_token(token)["sub"] == device.device_id


def test_access_token_of_revoked_device(verifier: Verifier, device: Device) -> None:
    verified = verifier.verify_assertion(http_assertion(verifier, device), audience_kind="http")
    token = verifier.issue_access_token(verified)["access_token"]
    verifier.revoke(device.device_id)
    assert reason_of(verifier.verify_access_token, token) == "revoked_device"


def test_assertion_as_access_token(verifier: Verifier, device: Device) -> None:
    assert reason_of(verifier.verify_access_token, http_assertion(verifier, device)) == "bad_type"


def test_access_token_of_other_verifier(
    verifier: Verifier, device: Device, tmp_path: Path, clock: ManualClock
) -> None:
    (tmp_path / "other").mkdir()
    other = make_verifier(tmp_path / "other", clock)
    other_device = enroll(other)
    verified = other.verify_assertion(http_assertion(other, other_device), audience_kind="http")
    token = other.issue_access_token(verified)["access_token"]
    assert reason_of(verifier.verify_access_token, token) == "bad_type"


def test_jwks_shape(verifier: Verifier) -> None:
    (key,) = verifier.jwks()["keys"]
    assert set(key) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert key["kty"] == "EC"
    assert key["crv"] == "P-256"
    assert key["alg"] == "ES256"
    assert key["use"] == "sig"
    assert "d" not in key


def test_signing_key_file_created_private(tmp_path: Path) -> None:
    path = tmp_path / "signing-key.pem"
    key = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_signing_key(path)
    assert again.private_numbers() == key.private_numbers()


def test_signing_key_file_readable_by_others_refused(tmp_path: Path) -> None:
    path = tmp_path / "signing-key.pem"
    load_or_create_signing_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_signing_key(path)


def test_open_keeps_signing_key(tmp_path: Path) -> None:
    first = Verifier.open(tmp_path / "verifier.db", verifier_config())
    jwks = first.jwks()
    first.close()
    second = Verifier.open(tmp_path / "verifier.db", verifier_config())
    assert second.jwks() == jwks
    second.close()
    assert (tmp_path / "verifier-signing-key.pem").exists()


# Configuration


def test_tls_issuer_without_bindings_refused() -> None:
    with pytest.raises(ConfigError, match="is a TLS URL but no certificate hashes"):
        verifier_config(http_channel_bindings=frozenset())


def test_plain_broker_with_bindings_refused() -> None:
    with pytest.raises(ConfigError, match="is not a TLS URL"):
        verifier_config(broker_audiences={PLAIN_BROKER: frozenset({BROKER_CB})})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"challenge_lifetime": 121}, "challenge lifetime 121 s is outside 1..120 s"),
        ({"challenge_lifetime": 0}, "challenge lifetime 0 s"),
        ({"leeway": -1}, "leeway -1 s"),
        ({"access_token_lifetime": 0}, "access token lifetime 0 s"),
        ({"algorithms": frozenset({"HS256"})}, "algorithms \\['HS256'\\] are not supported"),
        ({"algorithms": frozenset()}, "are not supported"),
        ({"issuer": "verifier.test"}, "is not an absolute URL"),
        ({"nonceless_audiences": frozenset({"mqtt://x:1"})}, "are not broker audiences"),
    ],
)
def test_invalid_config_rejected(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        verifier_config(**overrides)


def test_algorithm_allow_list_applies(tmp_path: Path, clock: ManualClock) -> None:
    verifier = make_verifier(tmp_path, clock, algorithms=frozenset({"ES256"}))
    token = verifier.create_enrollment_tokens()[0]
    reason = reason_of(verifier.enroll, make_csr(make_key("EdDSA")), token, "software", False)
    assert reason == "unsupported_algorithm"


def test_channel_bindings_from_pem(tmp_path: Path) -> None:
    import datetime

    from device_sdk.auth import tls_server_end_point
    from device_sdk.verifier import channel_bindings_from_pem

    def self_signed(common_name: str) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA384())
        )

    leaf, chain, rotated = self_signed("leaf"), self_signed("ca"), self_signed("next")
    current = tmp_path / "current.pem"
    current.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + chain.public_bytes(serialization.Encoding.PEM)
    )
    following = tmp_path / "next.pem"
    following.write_bytes(rotated.public_bytes(serialization.Encoding.PEM))

    assert channel_bindings_from_pem(current, following) == {
        tls_server_end_point(leaf.public_bytes(serialization.Encoding.DER)),
        tls_server_end_point(rotated.public_bytes(serialization.Encoding.DER)),
    }
    with pytest.raises(ConfigError, match="cannot read a PEM certificate"):
        channel_bindings_from_pem(tmp_path / "missing.pem")


def test_enrollment_audit_omits_token(verifier: Verifier, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    token = verifier.create_enrollment_tokens()[0]
    with caplog.at_level(logging.INFO, logger="device_sdk.verifier.audit"):
        record, _ = verifier.enroll(
            make_csr(make_key("ES256")), token, "software", False, "192.0.2.5"
        )
        with pytest.raises(VerificationError):
            verifier.enroll(make_csr(make_key("ES256")), token, "software", False, "192.0.2.6")
    lines = [r.getMessage() for r in caplog.records if r.name == "device_sdk.verifier.audit"]
    assert len(lines) == 2
    assert lines[0].startswith(f"event=enroll outcome=accept device_id={record.device_id}")
    assert "reason=enrollment_token_used" in lines[1]
    assert "client=192.0.2.6" in lines[1]
    assert token not in caplog.text


def test_csr_with_unknown_key_type_rejected(verifier: Verifier) -> None:
    # cryptography raises UnsupportedAlgorithm, not ValueError, for a key type it does not
    # know; before any token check, so anyone could turn it into a 500 from /v1/enroll.
    csr = x509.load_pem_x509_csr(make_csr(make_key("ES256")))
    der = csr.public_bytes(serialization.Encoding.DER)
    ec_public_key = bytes.fromhex("06072a8648ce3d0201")  # OID 1.2.840.10045.2.1
    unknown = der.replace(ec_public_key, bytes.fromhex("06072a8648ce3d0209"))
    pem = x509.load_der_x509_csr(unknown).public_bytes(serialization.Encoding.PEM)
    token = verifier.create_enrollment_tokens()[0]

    assert reason_of(verifier.enroll, pem, token, "software", False) == "unsupported_algorithm"
