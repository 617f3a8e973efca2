"""Attacks on the verifier found in review: lockouts, starvation, bad text and log injection."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from fastapi.testclient import TestClient
from fixtures_verifier import (
    HTTP_CB,
    ISSUER,
    NONCELESS_BROKER,
    PLAIN_BROKER,
    TOKEN_URL,
    Device,
    ManualClock,
    enroll,
    make_csr,
    make_key,
    make_verifier,
    verifier_config,
)

from device_sdk.auth import Challenge, b64url_encode, build_assertion
from device_sdk.auth.assertion import new_jti, sign_assertion
from device_sdk.cli.main import build_parser
from device_sdk.cli.verifier import MAX_TOKEN_COUNT, run_create_tokens
from device_sdk.errors import ConfigError, VerificationError
from device_sdk.verifier import RateLimit, Verifier
from device_sdk.verifier.app import create_app
from device_sdk.verifier.audit import MAX_VALUE_LENGTH, log_decision
from device_sdk.verifier.registry import SQLiteDeviceRegistry
from device_sdk.verifier.stores import SQLiteChallengeStore

AUDIT_LOGGER = "device_sdk.verifier.audit"
ATTACKER = ("203.0.113.66", 40000)
DEVICE_ADDRESS = ("198.51.100.7", 40001)
BROKER = ("192.0.2.10", 40002)


def reason_of(call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(VerificationError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value.reason


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == AUDIT_LOGGER]


def forged_assertion(device_id: str, challenge: Challenge) -> str:
    """Return an assertion naming ``device_id`` in kid but signed by a fresh key (HTTP claims)."""
    now = int(time.time())
    header = {"alg": "ES256", "typ": "device-assertion+jwt", "kid": device_id}
    claims = {
        "iss": device_id, "sub": device_id, "aud": ISSUER, "iat": now, "exp": now + 60,
        "jti": new_jti(), "nonce": challenge.nonce, "cb": b64url_encode(HTTP_CB),
        "htm": "POST", "htu": TOKEN_URL,
    }
    signing_input = ".".join(
        b64url_encode(json.dumps(part, separators=(",", ":")).encode())
        for part in (header, claims)
    )
    key = ec.generate_private_key(ec.SECP256R1())
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signing_input + "." + b64url_encode(signature)


def fetch_challenge(client: TestClient, device_id: str) -> Challenge:
    response = client.post("/v1/challenges", json={"device_id": device_id, "audience": ISSUER})
    assert response.status_code == 200, response.text
    return Challenge.from_json(response.json())


def log_in(client: TestClient, device: Device) -> int:
    challenge = fetch_challenge(client, device.device_id)
    assertion = build_assertion(
        device.key, challenge, channel_binding=HTTP_CB, htm="POST", htu=TOKEN_URL
    )
    return client.post("/v1/token", json={"assertion": assertion}).status_code


@pytest.fixture
def limited_verifier(tmp_path: Path, clock: ManualClock) -> Iterator[Verifier]:
    # The shipped defaults of VerifierConfig, which the shared fixtures turn off.
    instance = make_verifier(
        tmp_path,
        clock,
        challenge_limit_per_device=RateLimit(capacity=10, per_second=1 / 6),
        challenge_limit_per_address=RateLimit(capacity=60, per_second=1.0),
        failure_limit_per_device=RateLimit(capacity=10, per_second=1 / 30),
        failure_limit_per_address=RateLimit(capacity=30, per_second=1.0),
    )
    yield instance
    instance.close()


# Failed logins


def test_forged_kid_does_not_lock_device(limited_verifier: Verifier) -> None:
    device = enroll(limited_verifier)
    app = create_app(limited_verifier)
    with TestClient(app, client=ATTACKER) as attacker, TestClient(
        app, client=DEVICE_ADDRESS
    ) as honest:
        # A forged signature fails before the nonce is spent, so one challenge serves them all.
        challenge = fetch_challenge(attacker, device.device_id)
        forged_statuses = set()
        for _ in range(20):
            assertion = forged_assertion(device.device_id, challenge)
            forged_statuses.add(
                attacker.post("/v1/token", json={"assertion": assertion}).status_code
            )

        assert forged_statuses == {401}
        assert log_in(honest, device) == 200


def test_forged_assertions_limit_their_address(limited_verifier: Verifier) -> None:
    device = enroll(limited_verifier)
    challenge = Challenge.from_json(limited_verifier.issue_challenge(device.device_id, ISSUER))
    forged = forged_assertion(device.device_id, challenge)
    for _ in range(30):
        reason = reason_of(
            limited_verifier.verify_assertion,
            forged,
            audience_kind="http",
            client_address=ATTACKER[0],
        )
        assert reason == "bad_signature"

    reason = reason_of(
        limited_verifier.verify_assertion, forged, audience_kind="http", client_address=ATTACKER[0]
    )

    assert reason == "rate_limited"
    genuine = build_assertion(
        device.key,
        Challenge.from_json(limited_verifier.issue_challenge(device.device_id, ISSUER)),
        channel_binding=HTTP_CB,
        htm="POST",
        htu=TOKEN_URL,
    )
    verified = limited_verifier.verify_assertion(
        genuine, audience_kind="http", client_address=DEVICE_ADDRESS[0]
    )
    assert verified.device_id == device.device_id


def test_signed_failures_charge_device(tmp_path: Path, clock: ManualClock) -> None:
    verifier = make_verifier(
        tmp_path, clock, failure_limit_per_device=RateLimit(capacity=2, per_second=0.001)
    )
    device = enroll(verifier)
    challenge = Challenge.from_json(verifier.issue_challenge(device.device_id, ISSUER))
    assertion = build_assertion(
        device.key, challenge, channel_binding=HTTP_CB, htm="POST", htu=TOKEN_URL
    )
    verifier.verify_assertion(assertion, audience_kind="http", client_address="192.0.2.1")
    replays = [
        reason_of(
            verifier.verify_assertion, assertion, audience_kind="http", client_address=address
        )
        for address in ("192.0.2.2", "192.0.2.3", "192.0.2.4")
    ]
    verifier.close()

    assert replays == ["replayed", "replayed", "rate_limited"]


# Challenges


def test_challenge_requests_cannot_starve_device(limited_verifier: Verifier) -> None:
    device = enroll(limited_verifier)
    app = create_app(limited_verifier)
    body = {"device_id": device.device_id, "audience": ISSUER}
    with TestClient(app, client=ATTACKER) as attacker, TestClient(
        app, client=DEVICE_ADDRESS
    ) as honest:
        statuses = [attacker.post("/v1/challenges", json=body).status_code for _ in range(11)]

        assert statuses == [200] * 10 + [429]
        assert log_in(honest, device) == 200


def test_outstanding_challenges_capped(verifier: Verifier, device: Device) -> None:
    first = Challenge.from_json(verifier.issue_challenge(device.device_id, ISSUER))
    for number in range(32):
        verifier.issue_challenge(device.device_id, ISSUER, f"192.0.2.{number}")
    newest = Challenge.from_json(verifier.issue_challenge(device.device_id, ISSUER))

    dropped_assertion = build_assertion(
        device.key, first, channel_binding=HTTP_CB, htm="POST", htu=TOKEN_URL
    )
    newest_assertion = build_assertion(
        device.key, newest, channel_binding=HTTP_CB, htm="POST", htu=TOKEN_URL
    )

    reason = reason_of(verifier.verify_assertion, dropped_assertion, audience_kind="http")
    assert reason == "unknown_nonce"
    assert verifier.verify_assertion(newest_assertion, audience_kind="http").nonce == newest.nonce


# Text that is not Unicode


LONE_SURROGATE_ENROLL = (
    b'{"csr":"\\ud800","enrollment_token":"x","backend":"x","hardware_backed":false}'
)


def test_lone_surrogate_json_is_400(verifier: Verifier) -> None:
    with TestClient(create_app(verifier)) as client:
        enroll_response = client.post(
            "/v1/enroll",
            content=LONE_SURROGATE_ENROLL,
            headers={"Content-Type": "application/json"},
        )
        key_response = client.post(
            "/v1/challenges",
            content=b'{"device_id":"d","audience":"a","\\udfff":1}',
            headers={"Content-Type": "application/json"},
        )
        nested_response = client.post(
            "/v1/token",
            content=b'{"assertion":"a","extra":[{"x":["\\udc00"]}]}',
            headers={"Content-Type": "application/json"},
        )

    assert enroll_response.status_code == 400
    assert enroll_response.json() == {"error": "invalid_request"}
    assert key_response.status_code == 400
    assert nested_response.status_code == 400


def test_lone_surrogate_csr_is_bad_csr(verifier: Verifier) -> None:
    token = verifier.create_enrollment_tokens()[0]

    assert reason_of(verifier.enroll, "\ud800", token, "software", False) == "bad_csr"


# Audit log


def test_audit_escapes_control_characters(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        log_decision(
            "broker_vhost",
            "reject",
            device_id="\x1b[2Jdev\x07",
            client_address="10.0.0.1\nevent=forged",
            detail="back\\slash \u2028 \x7f \x85 \ud800 \U000e0001",
        )

    [record] = [record for record in caplog.records if record.name == AUDIT_LOGGER]
    line = record.getMessage()
    assert line == (
        "event=broker_vhost outcome=reject device_id=\\x1b[2Jdev\\x07 "
        'client="10.0.0.1\\x0aevent=forged" detail="back\\\\slash \\u2028 \\x7f \\x85 '
        '\\ud800 \\U000e0001"'
    )
    assert record.audit["device_id"] == "\\x1b[2Jdev\\x07"  # type: ignore[attr-defined]


def test_audit_caps_value_length(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        log_decision("assertion", "reject", reason="malformed", device_id="a" * 500)

    [line] = audit_lines(caplog)
    assert line == (
        'event=assertion outcome=reject reason=malformed device_id="'
        + "a" * MAX_VALUE_LENGTH
        + '...[300 more characters]"'
    )


def test_webhook_values_escaped_in_audit(
    verifier: Verifier, caplog: pytest.LogCaptureFixture
) -> None:
    form = {"username": "dev\x1b]0;pwned\x07", "vhost": "/", "ip": "10.0.0.9\x1b[1A"}
    with TestClient(create_app(verifier)) as client, caplog.at_level(
        logging.INFO, logger=AUDIT_LOGGER
    ):
        response = client.post("/v1/broker/auth/rabbitmq/vhost", data=form)

    assert response.text == "deny"
    [line] = audit_lines(caplog)
    assert "\x1b" not in line
    assert "\x07" not in line
    assert "device_id=dev\\x1b]0;pwned\\x07" in line
    assert "client=10.0.0.9\\x1b[1A" in line


# Enrollment


def test_two_csrs_in_one_field_rejected(verifier: Verifier) -> None:
    token = verifier.create_enrollment_tokens()[0]
    two = make_csr(make_key("ES256")) + make_csr(make_key("ES256"))

    assert reason_of(verifier.enroll, two, token, "software", False) == "bad_csr"


def test_reenrollment_leaves_fresh_token_unspent(verifier: Verifier, device: Device) -> None:
    fresh = verifier.create_enrollment_tokens()[0]

    record, created = verifier.enroll(make_csr(device.key), fresh, "software", False)

    assert record.device_id == device.device_id
    assert created is False
    other_key = make_key("ES256")
    other, other_created = verifier.enroll(make_csr(other_key), fresh, "software", False)
    assert other_created is True
    assert other.device_id != device.device_id


def test_reenrollment_over_http_is_200(verifier: Verifier, device: Device) -> None:
    fresh = verifier.create_enrollment_tokens()[0]
    body = {
        "csr": make_csr(device.key).decode(),
        "enrollment_token": fresh,
        "backend": "software",
        "hardware_backed": True,
    }
    with TestClient(create_app(verifier)) as client:
        response = client.post("/v1/enroll", json=body)

    assert response.status_code == 200
    assert response.json()["device"]["device_id"] == device.device_id
    # The record keeps what the first enrollment claimed.
    assert response.json()["device"]["hardware_backed"] is False


def create_token_args(*options: str) -> argparse.Namespace:
    return build_parser().parse_args(["verifier", "enrollment-token", "create", *options])


def test_token_count_capped(tmp_path: Path) -> None:
    db = tmp_path / "verifier.db"
    args = create_token_args("--db", str(db), "--count", str(MAX_TOKEN_COUNT + 1))

    with pytest.raises(ConfigError, match="--count must be between 1 and 10000, got 10001"):
        run_create_tokens(args)
    assert not db.exists()


def test_non_sqlite_db_is_config_error(tmp_path: Path) -> None:
    db = tmp_path / "notes.txt"
    db.write_text("this is not a database, just some text that is long enough\n" * 20)
    args = create_token_args("--db", str(db))

    with pytest.raises(ConfigError, match="is not a SQLite database") as caught:
        run_create_tokens(args)
    assert str(db) in str(caught.value)


def test_non_sqlite_registry_is_config_error(tmp_path: Path) -> None:
    db = tmp_path / "image.png"
    db.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)

    with pytest.raises(ConfigError, match=f"{db} is not a SQLite database"):
        SQLiteDeviceRegistry(db)


def test_hardware_backed_recorded_as_claimed(
    verifier: Verifier, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from device_sdk.cli.main import main as cli_main

    token = verifier.create_enrollment_tokens()[0]
    record, created = verifier.enroll(make_csr(make_key("ES256")), token, "pkcs11", True)
    capsys.readouterr()

    status = cli_main(["verifier", "devices", "list", "--db", str(tmp_path / "registry.db")])

    assert created is True
    assert record.hardware_backed is True
    assert record.attested is False
    assert status == 0
    [row] = capsys.readouterr().out.splitlines()[1:]
    assert row.split()[:5] == [record.device_id, "active", "ES256", "pkcs11", "claimed"]


def mqtt_challenge(verifier: Verifier, device: Device) -> Challenge:
    return Challenge.from_json(verifier.issue_challenge(device.device_id, PLAIN_BROKER))


def test_broker_address_never_limited(limited_verifier: Verifier) -> None:
    device = enroll(limited_verifier)
    forged = forged_assertion(device.device_id, mqtt_challenge(limited_verifier, device))
    form = {"username": device.device_id, "password": forged}
    with TestClient(create_app(limited_verifier), client=ATTACKER) as broker:
        # The RabbitMQ login check comes from the broker's address for every device.
        answers = {broker.post("/v1/broker/auth/rabbitmq/user", data=form).text for _ in range(40)}
        genuine = build_assertion(
            device.key, mqtt_challenge(limited_verifier, device), channel_binding=None
        )
        login = broker.post(
            "/v1/broker/auth/rabbitmq/user",
            data={"username": device.device_id, "password": genuine},
        )

    assert answers == {"deny"}
    assert login.text == "allow"


def test_emqx_peerhost_limited(limited_verifier: Verifier) -> None:
    device = enroll(limited_verifier)
    forged = forged_assertion(device.device_id, mqtt_challenge(limited_verifier, device))
    body = {"username": device.device_id, "password": forged, "peerhost": ATTACKER[0]}
    app = create_app(limited_verifier, trusted_broker_addresses=[BROKER[0]])
    with TestClient(app, client=BROKER) as broker:
        for _ in range(30):
            broker.post("/v1/broker/auth/emqx", json=body)
        genuine = build_assertion(
            device.key, mqtt_challenge(limited_verifier, device), channel_binding=None
        )
        from_attacker = broker.post(
            "/v1/broker/auth/emqx", json={**body, "password": genuine}
        )
        from_device = broker.post(
            "/v1/broker/auth/emqx",
            json={**body, "password": genuine, "peerhost": DEVICE_ADDRESS[0]},
        )

    # The attacker's address is over its failure budget, so even a genuine password is denied
    # from there, and not spent: the same password still logs in from the device's address.
    assert from_attacker.json() == {"result": "deny"}
    assert from_device.json() == {"result": "allow", "is_superuser": False}


def test_emqx_peerhost_ignored_from_untrusted(limited_verifier: Verifier) -> None:
    device = enroll(limited_verifier)
    forged = forged_assertion(device.device_id, mqtt_challenge(limited_verifier, device))
    # The caller claims the device's own address as peerhost, to use up its failure budget.
    body = {"username": device.device_id, "password": forged, "peerhost": DEVICE_ADDRESS[0]}
    app = create_app(limited_verifier, trusted_broker_addresses=[BROKER[0]])
    with TestClient(app, client=ATTACKER) as attacker:
        answers = {attacker.post("/v1/broker/auth/emqx", json=body).json()["result"]
                   for _ in range(40)}
    with TestClient(app, client=BROKER) as broker:
        genuine = build_assertion(
            device.key, mqtt_challenge(limited_verifier, device), channel_binding=None
        )
        login = broker.post(
            "/v1/broker/auth/emqx",
            json={**body, "password": genuine, "peerhost": DEVICE_ADDRESS[0]},
        )

    assert answers == {"deny"}
    assert login.json() == {"result": "allow", "is_superuser": False}


@pytest.mark.parametrize("claim", ["nonce", "jti"])
def test_lone_surrogate_claim_is_malformed(tmp_path: Path, clock: ManualClock, claim: str) -> None:
    # A device-signed nonce or jti with a lone surrogate cannot be stored in SQLite (or Redis):
    # it must be a rejection, not an UnicodeEncodeError that the app turns into a 500.
    registry = SQLiteDeviceRegistry(tmp_path / "verifier.db")
    verifier = Verifier(
        verifier_config(),
        registry=registry,
        challenges=SQLiteChallengeStore(registry.connections),
        clock=clock,
    )
    device = enroll(verifier)
    now = verifier.now()
    claims = {
        "iss": device.device_id,
        "sub": device.device_id,
        "aud": NONCELESS_BROKER,
        "iat": now,
        "exp": now + 20,
        "jti": new_jti(),
        claim: "\ud800",
    }
    token = sign_assertion(device.key, claims, device_id=device.device_id)
    with pytest.raises(VerificationError) as caught:
        verifier.verify_assertion(token, audience_kind="mqtt")
    assert caught.value.reason == "malformed"
    verifier.close()
