"""The paho composition against a real Mosquitto: fresh password per CONNECT, reconnects, TLS.

Mosquitto here accepts any password, so these tests check what the client sends and how it
reconnects. The RabbitMQ and amqtt tests cover the verifier's checks.
"""

from __future__ import annotations

import queue
import random
import ssl
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fixtures_services import Mosquitto, TestPKI

from device_sdk.auth import b64url_encode, device_id_of, tls_server_end_point
from device_sdk.errors import PasswordTooLongError
from device_sdk.mqtt import Backoff, DeviceMqttClient, Outcome

pytestmark = pytest.mark.slow


def connected_attempts(client: DeviceMqttClient) -> list:
    return [a for a in client.attempts if a.outcome == Outcome.CONNECTED]


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_nonceless_login_sends_device_id_and_assertion(mosquitto: Mosquitto) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    client = DeviceMqttClient(key, mosquitto.url, nonceless=True)

    attempt = client.connect_once()
    client.disconnect()

    assert attempt.outcome == Outcome.CONNECTED
    assert attempt.nonce is None
    assert attempt.cb is None
    assert attempt.jti is not None
    assert client.paho.username == device_id_of(key)
    # The used password was cleared after CONNECT, so it can never be sent again.
    assert client.paho.password is None


def test_reconnect_after_restart_mints_new_assertion(mosquitto: Mosquitto) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    client = DeviceMqttClient(
        key, mosquitto.url, nonceless=True, backoff=Backoff(base=0.2, cap=1.0)
    )
    received: queue.Queue[bytes] = queue.Queue()
    client.paho.on_message = lambda _c, _u, message: received.put(message.payload)
    client.on_connect = lambda device, _present: device.paho.subscribe("devices/echo", qos=1)
    client.start()
    try:
        assert client.wait_connected(10)
        mosquitto.restart()
        wait_for(lambda: len(connected_attempts(client)) >= 2, 20, "a second connection")
        wait_for(lambda: client.connected, 5, "the client to be connected")
        client.paho.publish("devices/echo", b"after restart", qos=1)
        assert received.get(timeout=10) == b"after restart"
    finally:
        client.stop()

    first, second = connected_attempts(client)[:2]
    assert first.jti != second.jti
    lost = [a for a in client.attempts if a.outcome == Outcome.NETWORK]
    assert lost[0].detail == "connection lost"
    assert 0.0 <= lost[0].delay <= 0.2


def test_tls_assertion_binds_broker_certificate(mosquitto: Mosquitto, test_pki: TestPKI) -> None:
    port = mosquitto.add_tls_listener(test_pki.server.cert_pem, test_pki.server.key_pem)
    mosquitto.restart()
    key = ec.generate_private_key(ec.SECP256R1())
    url = f"mqtts://127.0.0.1:{port}"
    client = DeviceMqttClient(
        key, url, nonceless=True, tls_context=test_pki.client_ssl_context()
    )

    attempt = client.connect_once()
    client.disconnect()

    der = ssl.PEM_cert_to_DER_cert(test_pki.server.cert_pem.decode())
    assert attempt.cb == b64url_encode(tls_server_end_point(der))


def test_password_over_broker_limit_stops_client(mosquitto: Mosquitto) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    client = DeviceMqttClient(key, mosquitto.url, nonceless=True, broker_password_limit=100)

    with pytest.raises(PasswordTooLongError) as caught:
        client.connect_once()

    assert caught.value.limit == 100
    assert caught.value.length > 100
    assert str(caught.value).startswith(
        f"MQTT password of {caught.value.length} bytes exceeds the configured broker limit of 100"
    )


def test_network_failures_back_off_with_jitter(mosquitto: Mosquitto) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    url = mosquitto.url
    mosquitto.stop()
    client = DeviceMqttClient(
        key, url, nonceless=True, backoff=Backoff(base=0.1, cap=0.8, rng=random.Random(11))
    )
    client.start()
    try:
        wait_for(lambda: len(client.attempts) >= 6, 20, "six failed attempts")
    finally:
        client.stop()

    attempts = list(client.attempts)[:6]
    expected = random.Random(11)
    for number, attempt in enumerate(attempts[:5]):
        ceiling = min(0.8, 0.1 * 2**number)
        assert attempt.outcome == Outcome.NETWORK
        assert attempt.delay == expected.uniform(0.0, ceiling)
        gap = attempts[number + 1].started - attempt.started
        assert gap >= attempt.delay


def test_not_authorised_mints_once_more_then_backs_off(mosquitto: Mosquitto) -> None:
    # Mosquitto with a password file refuses the device's assertion with CONNACK 5.
    mosquitto.set_password_file({"someone-else": "secret"})
    mosquitto.restart()
    key = ec.generate_private_key(ec.SECP256R1())
    client = DeviceMqttClient(
        key, mosquitto.url, nonceless=True, backoff=Backoff(base=0.1, cap=0.4, rng=random.Random(4))
    )
    client.start()
    try:
        wait_for(lambda: len(client.attempts) >= 4, 10, "four refused attempts")
    finally:
        client.stop()

    attempts = list(client.attempts)[:4]
    expected = random.Random(4)
    assert [a.outcome for a in attempts] == [Outcome.NOT_AUTHORISED] * 4
    assert [a.detail for a in attempts] == ["CONNACK 135 (Not authorized)"] * 4
    assert attempts[0].delay == 0.0
    assert attempts[1].delay == expected.uniform(0.0, 0.1)
    assert attempts[2].delay == expected.uniform(0.0, 0.2)
    assert attempts[3].delay == expected.uniform(0.0, 0.4)
    # Every attempt carried its own assertion.
    assert len({a.jti for a in attempts}) == 4


def test_callback_error_reconnects_instead_of_dying(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    client = DeviceMqttClient(
        key, mosquitto.url, nonceless=True, backoff=Backoff(base=0.1, cap=0.2)
    )
    received: set[bytes] = set()
    failures = []

    def on_message(_client: object, _userdata: object, message: object) -> None:
        payload = message.payload  # type: ignore[attr-defined]
        if payload == b"boom" and not failures:
            failures.append(payload)
            raise RuntimeError("handler failed")
        received.add(payload)

    client.paho.on_message = on_message
    client.on_connect = lambda device, _present: device.paho.subscribe("devices/boom", qos=1)
    client.start()
    try:
        assert client.wait_connected(10)
        client.paho.publish("devices/boom", b"boom", qos=1)
        wait_for(lambda: len(connected_attempts(client)) >= 2, 10, "a reconnect")
        wait_for(lambda: client.connected, 5, "the client to be connected")
        client.paho.publish("devices/boom", b"after", qos=1)
        wait_for(lambda: b"after" in received, 10, "the second message")
    finally:
        client.stop()

    # The broker redelivers the unacknowledged QoS 1 message to the kept session.
    assert received == {b"boom", b"after"}
    assert "error in the MQTT network loop; reconnecting" in caplog.text
