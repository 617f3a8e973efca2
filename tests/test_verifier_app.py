"""The verifier's ASGI app: endpoints, status codes, bodies and audit lines."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from fixtures_verifier import (
    HTTP_CB,
    ISSUER,
    PLAIN_BROKER,
    TOKEN_URL,
    Device,
    ManualClock,
    enroll,
    make_csr,
    make_key,
    make_verifier,
)

from device_sdk.auth import Challenge, build_assertion, device_id_of
from device_sdk.verifier import RateLimit, Verifier
from device_sdk.verifier.app import MAX_BODY_BYTES, create_app

AUDIT_LOGGER = "device_sdk.verifier.audit"


@pytest.fixture
def client(verifier: Verifier) -> Iterator[TestClient]:
    with TestClient(create_app(verifier), raise_server_exceptions=True) as test_client:
        yield test_client


def fetch_challenge(client: TestClient, device: Device, audience: str = ISSUER) -> Challenge:
    response = client.post(
        "/v1/challenges", json={"device_id": device.device_id, "audience": audience}
    )
    assert response.status_code == 200, response.text
    return Challenge.from_json(response.json())


def login_assertion(client: TestClient, device: Device) -> str:
    challenge = fetch_challenge(client, device)
    return build_assertion(
        device.key, challenge, channel_binding=HTTP_CB, htm="POST", htu=TOKEN_URL
    )


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == AUDIT_LOGGER]


def test_challenge_response_shape(client: TestClient, device: Device, clock: ManualClock) -> None:
    response = client.post(
        "/v1/challenges", json={"device_id": device.device_id, "audience": ISSUER}
    )

    assert response.status_code == 200
    body = response.json()
    assert sorted(body) == ["audience", "device_id", "expires_at", "nonce", "server_time"]
    assert body["device_id"] == device.device_id
    assert body["audience"] == ISSUER
    assert body["server_time"] == int(clock.now)
    assert body["expires_at"] == int(clock.now) + 60
    assert len(body["nonce"]) == 43
    assert response.headers["cache-control"] == "no-store"


def test_login_token_and_whoami(client: TestClient, device: Device) -> None:
    response = client.post("/v1/token", json={"assertion": login_assertion(client, device)})

    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert response.headers["cache-control"] == "no-store"

    whoami = client.get("/v1/whoami", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert whoami.status_code == 200
    assert whoami.json()["device_id"] == device.device_id


def test_access_token_verifies_with_jwks(client: TestClient, device: Device) -> None:
    token = client.post(
        "/v1/token", json={"assertion": login_assertion(client, device)}
    ).json()["access_token"]
    jwks = client.get("/.well-known/jwks.json").json()

    [jwk] = jwks["keys"]
    assert jwk["kty"] == "EC"
    assert jwk["crv"] == "P-256"
    key = jwt.PyJWK(jwk).key
    claims = jwt.decode(token, key, algorithms=["ES256"], audience=ISSUER, issuer=ISSUER)
    assert claims["sub"] == device.device_id
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"


def test_token_replay_plain_401_audited(
    client: TestClient, device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    assertion = login_assertion(client, device)
    assert client.post("/v1/token", json={"assertion": assertion}).status_code == 200

    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        replay = client.post("/v1/token", json={"assertion": assertion})

    assert replay.status_code == 401
    assert replay.json() == {"error": "unauthorized"}
    [line] = [line for line in audit_lines(caplog) if "outcome=reject" in line]
    assert "reason=replayed" in line
    assert f"device_id={device.device_id}" in line
    assert "client=testclient" in line


def test_unknown_device_gets_no_challenge(client: TestClient) -> None:
    stranger = make_key("ES256")

    response = client.post(
        "/v1/challenges", json={"device_id": device_id_of(stranger), "audience": ISSUER}
    )

    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}


def test_unserved_audience_gets_401(client: TestClient, device: Device) -> None:
    response = client.post(
        "/v1/challenges",
        json={"device_id": device.device_id, "audience": "https://elsewhere.test"},
    )

    assert response.status_code == 401


@pytest.mark.parametrize(
    ("path", "content_type", "body", "status"),
    [
        ("/v1/challenges", "application/json", b"not json", 400),
        ("/v1/challenges", "application/json", b"[]", 400),
        ("/v1/challenges", "application/json", b'{"device_id": 1, "audience": "x"}', 400),
        ("/v1/challenges", "application/json", b'{"device_id": "short", "audience": "x"}', 400),
        ("/v1/challenges", "application/json", b'{"audience": "a", "audience": "b"}', 400),
        ("/v1/challenges", "application/json", b"\xff\xfe", 400),
        ("/v1/challenges", "text/plain", b"{}", 415),
        ("/v1/challenges", "", b"{}", 415),
        ("/v1/token", "application/json", b'{"assertion": null}', 400),
        ("/v1/token", "application/json", b'{"assertion": "a.b.c"}', 401),
        ("/v1/token", "application/json", b'{"assertion": NaN}', 400),
        ("/v1/token", "application/x-www-form-urlencoded", b"assertion=a.b.c", 415),
        ("/v1/enroll", "application/json", b'{"csr": "x"}', 400),
        (
            "/v1/enroll",
            "application/json",
            b'{"csr": "x", "enrollment_token": "t", "backend": "b", "hardware_backed": "no"}',
            400,
        ),
        ("/v1/broker/auth/emqx", "application/json", b'{"username": 5}', 400),
        ("/v1/broker/auth/rabbitmq/user", "application/json", b"{}", 415),
        ("/v1/broker/auth/rabbitmq/user", "application/x-www-form-urlencoded", b"username=a", 400),
        (
            "/v1/broker/auth/rabbitmq/user",
            "application/x-www-form-urlencoded",
            b"username=a&username=b&password=c",
            400,
        ),
        ("/v1/broker/auth/rabbitmq/user", "application/x-www-form-urlencoded", b"%zz=&&", 400),
    ],
)
def test_malformed_request_is_4xx(
    client: TestClient, path: str, content_type: str, body: bytes, status: int
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}

    response = client.post(path, content=body, headers=headers)

    assert response.status_code == status, response.text


def test_oversized_body_is_413(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    body = json.dumps({"assertion": "a" * (1024 * 1024)})

    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        response = client.post(
            "/v1/token", content=body, headers={"Content-Type": "application/json"}
        )

    assert response.status_code == 413
    assert response.json() == {"error": "request_too_large"}
    [line] = audit_lines(caplog)
    assert "reason=malformed" in line
    assert f"exceeds {MAX_BODY_BYTES}" in line
    assert "client=testclient" in line


def test_oversized_chunked_body_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"x" * 4096

    response = client.post(
        "/v1/token", content=chunks(), headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 413


def test_wrong_method_and_unknown_path(client: TestClient) -> None:
    assert client.get("/v1/token").status_code == 405
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/docs").status_code == 404


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer not-a-token", "Bearer a.b.c"],
)
def test_whoami_rejects_bad_bearer(client: TestClient, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}

    response = client.get("/v1/whoami", headers=headers)

    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_whoami_rejects_revoked_device(
    client: TestClient, verifier: Verifier, device: Device
) -> None:
    token = client.post(
        "/v1/token", json={"assertion": login_assertion(client, device)}
    ).json()["access_token"]
    verifier.revoke(device.device_id)

    response = client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})

    assert response.status_code == 401


def test_challenge_rate_limit_is_429(tmp_path: Path, clock: ManualClock) -> None:
    verifier = make_verifier(
        tmp_path, clock, challenge_limit_per_device=RateLimit(capacity=2, per_second=0.1)
    )
    device = enroll(verifier)
    body = {"device_id": device.device_id, "audience": ISSUER}
    with TestClient(create_app(verifier)) as client:
        statuses = [client.post("/v1/challenges", json=body).status_code for _ in range(2)]
        limited = client.post("/v1/challenges", json=body)
    verifier.close()

    assert statuses == [200, 200]
    assert limited.status_code == 429
    assert limited.json() == {"error": "rate_limited"}
    assert limited.headers["retry-after"] == "10"


def test_token_failure_rate_limit_is_429(tmp_path: Path, clock: ManualClock) -> None:
    verifier = make_verifier(
        tmp_path, clock, failure_limit_per_device=RateLimit(capacity=1, per_second=0.5)
    )
    device = enroll(verifier)
    with TestClient(create_app(verifier)) as client:
        assertion = login_assertion(client, device)
        first = client.post("/v1/token", json={"assertion": assertion})
        replay = client.post("/v1/token", json={"assertion": assertion})
        limited = client.post("/v1/token", json={"assertion": login_assertion(client, device)})
    verifier.close()

    assert first.status_code == 200
    assert replay.status_code == 401
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"


# Enrollment


def enroll_body(csr: bytes, token: str) -> dict[str, object]:
    return {
        "csr": csr.decode(),
        "enrollment_token": token,
        "backend": "software",
        "hardware_backed": False,
    }


def test_enroll_creates_device(client: TestClient, verifier: Verifier) -> None:
    key = make_key("ES256")
    token = verifier.create_enrollment_tokens()[0]

    response = client.post("/v1/enroll", json=enroll_body(make_csr(key), token))

    assert response.status_code == 201
    body = response.json()
    assert body["certificate"] is None
    device = body["device"]
    assert device["algorithm"] == "ES256"
    assert device["status"] == "active"
    assert device["backend"] == "software"
    assert device["hardware_backed"] is False
    record = verifier.get_device(device["device_id"])
    assert record is not None
    assert record.public_key_pem == device["public_key_pem"]


def test_enroll_token_single_use(client: TestClient, verifier: Verifier) -> None:
    key = make_key("ES256")
    other = make_key("ES256")
    token = verifier.create_enrollment_tokens()[0]
    first = client.post("/v1/enroll", json=enroll_body(make_csr(key), token))

    again = client.post("/v1/enroll", json=enroll_body(make_csr(key), token))
    stolen = client.post("/v1/enroll", json=enroll_body(make_csr(other), token))

    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json()["device"] == first.json()["device"]
    assert stolen.status_code == 401
    assert stolen.json() == {"error": "unauthorized"}
    assert len(verifier.list_devices()) == 1


def test_enroll_checks_csr_signature(
    client: TestClient, verifier: Verifier, caplog: pytest.LogCaptureFixture
) -> None:
    key = make_key("ES256")
    honest_pem = make_csr(key)
    der = x509.load_pem_x509_csr(honest_pem).public_bytes(serialization.Encoding.DER)
    # The signature BIT STRING ends the DER, so flipping the last bit changes s and nothing else.
    forged_der = der[:-1] + bytes([der[-1] ^ 1])
    forged_pem = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(forged_der)
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    token = verifier.create_enrollment_tokens()[0]

    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        response = client.post("/v1/enroll", json=enroll_body(forged_pem, token))

    assert response.status_code == 401
    assert any("reason=bad_csr" in line for line in audit_lines(caplog))
    assert verifier.list_devices() == []
    # The token was not spent by the failed attempt.
    assert client.post("/v1/enroll", json=enroll_body(make_csr(key), token)).status_code == 201


def test_enroll_rejects_unknown_token(client: TestClient) -> None:
    response = client.post(
        "/v1/enroll", json=enroll_body(make_csr(make_key("ES256")), "no-such-token")
    )

    assert response.status_code == 401


# Broker webhooks, in process (the HTTP tests with real servers are in test_verifier_http.py)


def mqtt_password(verifier: Verifier, device: Device, audience: str = PLAIN_BROKER) -> str:
    challenge = Challenge.from_json(verifier.issue_challenge(device.device_id, audience))
    return build_assertion(device.key, challenge, channel_binding=None)


def test_rabbitmq_user_allow_then_deny_replay(
    client: TestClient, verifier: Verifier, device: Device
) -> None:
    form = {
        "username": device.device_id,
        "password": mqtt_password(verifier, device),
        "vhost": "/",
        "client_id": "sensor-1",
    }

    first = client.post("/v1/broker/auth/rabbitmq/user", data=form)
    replay = client.post("/v1/broker/auth/rabbitmq/user", data=form)

    assert first.status_code == 200
    assert first.text == "allow"
    assert first.headers["content-type"].startswith("text/plain")
    assert replay.text == "deny"


def test_rabbitmq_user_wrong_username_denied(
    client: TestClient, verifier: Verifier, device: Device
) -> None:
    other = enroll(verifier)
    form = {"username": other.device_id, "password": mqtt_password(verifier, device)}

    assert client.post("/v1/broker/auth/rabbitmq/user", data=form).text == "deny"


def test_rabbitmq_user_rejects_http_assertion(
    client: TestClient, verifier: Verifier, device: Device
) -> None:
    form = {"username": device.device_id, "password": login_assertion(client, device)}

    assert client.post("/v1/broker/auth/rabbitmq/user", data=form).text == "deny"


@pytest.mark.parametrize(
    ("path", "fields", "expected"),
    [
        ("vhost", {"vhost": "/", "ip": "127.0.0.1"}, "allow"),
        ("vhost", {"vhost": "other", "ip": "127.0.0.1"}, "deny"),
        ("resource", {"vhost": "/", "resource": "exchange", "name": "amq.topic",
                      "permission": "write"}, "allow"),
        ("resource", {"vhost": "/", "resource": "queue", "name": "mqtt-subscription-xqos0",
                      "permission": "configure"}, "allow"),
        ("resource", {"vhost": "/", "resource": "exchange", "name": "amq.direct",
                      "permission": "write"}, "deny"),
        ("resource", {"vhost": "/", "resource": "queue", "name": "q",
                      "permission": "delete"}, "deny"),
        ("topic", {"vhost": "/", "resource": "topic", "name": "amq.topic", "permission": "write",
                   "routing_key": "sensors.temp"}, "allow"),
        ("topic", {"vhost": "/", "resource": "topic", "name": "amq.fanout", "permission": "read",
                   "routing_key": "x"}, "deny"),
    ],
)
def test_rabbitmq_authorization_paths(
    client: TestClient, device: Device, path: str, fields: dict[str, str], expected: str
) -> None:
    response = client.post(
        f"/v1/broker/auth/rabbitmq/{path}", data={"username": device.device_id, **fields}
    )

    assert response.status_code == 200
    assert response.text == expected


def test_rabbitmq_authorization_denies_revoked(
    client: TestClient, verifier: Verifier, device: Device
) -> None:
    verifier.revoke(device.device_id)
    form = {"username": device.device_id, "vhost": "/", "ip": "127.0.0.1"}

    assert client.post("/v1/broker/auth/rabbitmq/vhost", data=form).text == "deny"


def test_emqx_allow_and_deny(client: TestClient, verifier: Verifier, device: Device) -> None:
    body = {
        "username": device.device_id,
        "password": mqtt_password(verifier, device),
        "clientid": "sensor-1",
        "peerhost": "192.0.2.7",
    }

    first = client.post("/v1/broker/auth/emqx", json=body)
    replay = client.post("/v1/broker/auth/emqx", json=body)

    assert first.status_code == 200
    assert first.json() == {"result": "allow", "is_superuser": False}
    assert replay.status_code == 200
    assert replay.json() == {"result": "deny"}


def test_emqx_form_body(client: TestClient, verifier: Verifier, device: Device) -> None:
    form = {"username": device.device_id, "password": mqtt_password(verifier, device)}

    response = client.post("/v1/broker/auth/emqx", data=form)

    assert response.status_code == 200
    assert response.json() == {"result": "allow", "is_superuser": False}


def test_emqx_deny_logs_trusted_peer_address(
    verifier: Verifier, device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"username": device.device_id, "password": "x.y.z", "peerhost": "192.0.2.7"}
    # Starlette's TestClient connects from the host name "testclient".
    app = create_app(verifier, trusted_broker_addresses=["testclient"])

    with TestClient(app) as broker, caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        response = broker.post("/v1/broker/auth/emqx", json=body)

    assert response.json() == {"result": "deny"}
    [line] = audit_lines(caplog)
    assert "client=192.0.2.7" in line
    assert "reason=malformed" in line


def test_emqx_untrusted_peerhost_not_logged_as_client(
    client: TestClient, device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"username": device.device_id, "password": "x.y.z", "peerhost": "192.0.2.7"}

    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        response = client.post("/v1/broker/auth/emqx", json=body)

    assert response.json() == {"result": "deny"}
    [line] = audit_lines(caplog)
    assert "client=testclient" in line
    assert "reason=malformed" in line


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_app_never_serves_private_key(client: TestClient) -> None:
    jwks = client.get("/.well-known/jwks.json").json()

    assert "d" not in jwks["keys"][0]
