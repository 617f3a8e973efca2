"""Broker webhooks under /v1/brokers/<host:port>/ accept only passwords minted for that broker.

A verifier that serves several brokers must not let one broker, having received a device's
password, log in with it at another. The paths without a broker name accept any of the
verifier's broker audiences, as a single-broker setup needs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fixtures_verifier import (
    PLAIN_BROKER,
    Device,
    ManualClock,
    enroll,
    make_verifier,
)

from device_sdk.auth import Challenge, build_assertion
from device_sdk.errors import ConfigError
from device_sdk.verifier import Verifier, VerifierConfig
from device_sdk.verifier.app import create_app
from device_sdk.verifier.config import broker_name

AUDIT_LOGGER = "device_sdk.verifier.audit"
# PLAIN_BROKER is mqtt://127.0.0.1:1883 and NONCELESS_BROKER mqtt://127.0.0.1:1884.
PLAIN_PATH = "/v1/brokers/127.0.0.1:1883/auth"
OTHER_PATH = "/v1/brokers/127.0.0.1:1884/auth"


@pytest.fixture
def verifier(tmp_path: Path, clock: ManualClock) -> Iterator[Verifier]:
    instance = make_verifier(tmp_path, clock)
    yield instance
    instance.close()


@pytest.fixture
def device(verifier: Verifier) -> Device:
    return enroll(verifier)


def password_for(verifier: Verifier, device: Device, broker: str = PLAIN_BROKER) -> str:
    challenge = Challenge.from_json(verifier.issue_challenge(device.device_id, broker))
    return build_assertion(device.key, challenge, channel_binding=None)


def test_broker_name_is_host_and_port() -> None:
    assert broker_name("mqtts://Broker.Example.com:8883") == "broker.example.com:8883"
    assert broker_name("mqtt://[::1]:1883") == "[::1]:1883"


def test_rabbitmq_password_for_its_broker_allowed(verifier: Verifier, device: Device) -> None:
    form = {"username": device.device_id, "password": password_for(verifier, device)}
    with TestClient(create_app(verifier)) as broker:
        answer = broker.post(PLAIN_PATH + "/rabbitmq/user", data=form)
    assert answer.status_code == 200
    assert answer.text == "allow"


def test_rabbitmq_password_for_other_broker_denied(
    verifier: Verifier, device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, AUDIT_LOGGER)
    # Minted for 127.0.0.1:1883, presented by the broker at 127.0.0.1:1884.
    form = {"username": device.device_id, "password": password_for(verifier, device)}
    with TestClient(create_app(verifier)) as other_broker:
        replayed = other_broker.post(OTHER_PATH + "/rabbitmq/user", data=form)
        own = other_broker.post(PLAIN_PATH + "/rabbitmq/user", data=form)

    assert replayed.text == "deny"
    assert 'reason=wrong_audience' in caplog.text
    assert 'detail="aud is another broker than the one checking the login"' in caplog.text
    # The refused attempt did not spend the nonce: the rightful broker still logs the device in.
    assert own.text == "allow"


def test_emqx_password_for_other_broker_denied(verifier: Verifier, device: Device) -> None:
    body = {"username": device.device_id, "password": password_for(verifier, device)}
    with TestClient(create_app(verifier)) as broker:
        replayed = broker.post(OTHER_PATH + "/emqx", json=body)
        own = broker.post(PLAIN_PATH + "/emqx", json=body)
    assert replayed.json() == {"result": "deny"}
    assert own.json() == {"result": "allow", "is_superuser": False}


def test_unnamed_path_accepts_any_broker(verifier: Verifier, device: Device) -> None:
    form = {"username": device.device_id, "password": password_for(verifier, device)}
    with TestClient(create_app(verifier)) as broker:
        answer = broker.post("/v1/broker/auth/rabbitmq/user", data=form)
    assert answer.text == "allow"


def test_unknown_broker_name_not_found(verifier: Verifier, device: Device) -> None:
    form = {"username": device.device_id, "password": password_for(verifier, device)}
    with TestClient(create_app(verifier)) as broker:
        answer = broker.post("/v1/brokers/broker.invalid:1883/auth/rabbitmq/user", data=form)
    assert answer.status_code == 404
    assert answer.json() == {"error": "unknown_broker"}


@pytest.mark.parametrize("check", ["vhost", "resource", "topic"])
def test_named_rabbitmq_checks_served(verifier: Verifier, device: Device, check: str) -> None:
    form = {
        "username": device.device_id,
        "vhost": "/",
        "resource": "topic" if check != "vhost" else "",
        "name": "amq.topic",
        "permission": "write",
        "routing_key": "devices/x",
    }
    with TestClient(create_app(verifier)) as broker:
        answer = broker.post(f"{PLAIN_PATH}/rabbitmq/{check}", data=form)
    assert answer.status_code == 200
    assert answer.text == "allow"


def test_shared_host_and_port_rejected() -> None:
    with pytest.raises(ConfigError) as caught:
        VerifierConfig(
            issuer="http://127.0.0.1:8080",
            broker_audiences={"mqtt://h:1883": frozenset(), "ws://h:1883": frozenset()},
        )
    assert str(caught.value) == (
        "broker audiences mqtt://h:1883 and ws://h:1883 share the host and port h:1883, which "
        "names a broker in webhook paths; give each broker its own host and port"
    )


@pytest.mark.parametrize(
    "audience", ["mqtt://user:secret@broker.test:1883", "mqtt://br%6Fker.test:1883"]
)
def test_audience_with_user_or_escape_rejected(audience: str) -> None:
    with pytest.raises(ConfigError) as caught:
        VerifierConfig(issuer="http://127.0.0.1:8080", broker_audiences={audience: frozenset()})
    assert str(caught.value) == (
        f"broker audience {audience!r} has a user, password or %-escape in its host part; "
        "write it as scheme://host:port"
    )


def test_unknown_broker_name_logged_as_such(
    verifier: Verifier, device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, AUDIT_LOGGER)
    with TestClient(create_app(verifier)) as broker:
        broker.post("/v1/brokers/broker.invalid:1883/auth/emqx", json={})
    assert "reason=unknown_broker" in caplog.text
