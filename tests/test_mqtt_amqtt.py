"""MQTT login over TLS to the embedded amqtt broker, whose verifier plugin checks each CONNECT.

The broker runs in this process with a :class:`Verifier` on the same SQLite database as the
verifier served by uvicorn, which issues the challenges. So a challenge issued over HTTPS is
spent once by the broker. The broker listens with TLS, so every assertion carries ``cb``.
"""

from __future__ import annotations

import queue
import ssl
import uuid
from typing import Any

import httpx
import jwt
import paho.mqtt.client as mqtt
import pytest
from fixtures_login import AmqttStack
from fixtures_services import HOST
from paho.mqtt.enums import CallbackAPIVersion

from device_sdk.auth import (
    b64url_encode,
    challenge_flow,
    mqtt_password_flow,
    tls_server_end_point,
)
from device_sdk.auth.assertion import new_jti, sign_assertion
from device_sdk.auth.challenge import Challenge
from device_sdk.mqtt import Backoff, DeviceMqttClient, Outcome

pytestmark = pytest.mark.slow

# amqtt rejects a login with MQTT 3.1.1 CONNACK 5, which paho 2 reports as 135.
NOT_AUTHORIZED = 135


def fetch_challenge(stack: AmqttStack, key: Any) -> Challenge:
    flow = challenge_flow(key, stack.broker_url)
    request = next(flow)
    response = httpx.post(
        stack.verifier.url + request.path, json=request.to_json(), verify=stack.tls_context()
    )
    try:
        flow.send(response.json())
    except StopIteration as done:
        challenge: Challenge = done.value[0]
        return challenge
    raise AssertionError("challenge flow did not finish")


def broker_binding(stack: AmqttStack) -> bytes:
    return tls_server_end_point(ssl.PEM_cert_to_DER_cert(stack.pki.server.cert_pem.decode()))


def mint_password(stack: AmqttStack, key: Any) -> str:
    flow = mqtt_password_flow(key, stack.broker_url, broker_binding(stack))
    request = next(flow)
    response = httpx.post(
        stack.verifier.url + request.path, json=request.to_json(), verify=stack.tls_context()
    )
    try:
        flow.send(response.json())
    except StopIteration as done:
        return str(done.value)
    raise AssertionError("password flow did not finish")


def raw_connect(stack: AmqttStack, username: str, password: str) -> int:
    codes: queue.Queue[int] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}")
    client.tls_set_context(stack.tls_context())
    client.username_pw_set(username, password)
    client.on_connect = lambda _c, _u, _f, reason, _p: codes.put(reason.value)
    client.connect(HOST, stack.port)
    client.loop_start()
    try:
        return codes.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def device_client(stack: AmqttStack, key: Any) -> DeviceMqttClient:
    return DeviceMqttClient(
        key,
        stack.broker_url,
        verifier_url=stack.verifier.url,
        verify=stack.tls_context(),
        tls_context=stack.tls_context(),
        backoff=Backoff(base=0.2, cap=2.0),
    )


def test_publish_and_receive_qos1_over_tls(amqtt_stack: AmqttStack, device_key: Any) -> None:
    amqtt_stack.verifier.enroll(device_key)
    client = device_client(amqtt_stack, device_key)
    received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscribed: queue.Queue[int] = queue.Queue()
    client.paho.on_message = lambda _c, _u, message: received.put(message)
    client.paho.on_subscribe = lambda _c, _u, _mid, codes, _p: subscribed.put(codes[0].value)
    client.on_connect = lambda device, _present: device.paho.subscribe("devices/amqtt", qos=1)

    client.start()
    try:
        assert client.wait_connected(15)
        assert subscribed.get(timeout=10) == 1
        info = client.paho.publish("devices/amqtt", b"over tls", qos=1)
        info.wait_for_publish(10)
        message = received.get(timeout=10)
    finally:
        client.stop()

    assert message.payload == b"over tls"
    assert message.qos == 1
    attempt = [a for a in client.attempts if a.outcome == Outcome.CONNECTED][0]
    assert attempt.cb == b64url_encode(broker_binding(amqtt_stack))


def test_wrong_key_refused_by_amqtt(
    amqtt_stack: AmqttStack, device_key: Any, software_key: Any
) -> None:
    device_id = amqtt_stack.verifier.enroll(device_key)
    challenge = fetch_challenge(amqtt_stack, device_key)
    now = challenge.server_time
    claims = {
        "iss": device_id, "sub": device_id, "aud": amqtt_stack.broker_url, "iat": now,
        "exp": now + 60, "jti": new_jti(), "nonce": challenge.nonce,
        "cb": b64url_encode(broker_binding(amqtt_stack)),
    }
    forged = sign_assertion(software_key, claims, device_id=device_id)

    assert raw_connect(amqtt_stack, device_id, forged) == NOT_AUTHORIZED


def test_replayed_token_refused_by_amqtt(amqtt_stack: AmqttStack, device_key: Any) -> None:
    device_id = amqtt_stack.verifier.enroll(device_key)
    password = mint_password(amqtt_stack, device_key)

    assert raw_connect(amqtt_stack, device_id, password) == 0
    assert raw_connect(amqtt_stack, device_id, password) == NOT_AUTHORIZED


def test_other_broker_certificate_refused_by_amqtt(
    amqtt_stack: AmqttStack, device_key: Any
) -> None:
    # The device signed for the certificate of a proxy, not of this broker.
    device_id = amqtt_stack.verifier.enroll(device_key)
    proxy_der = ssl.PEM_cert_to_DER_cert(amqtt_stack.pki.other_server.cert_pem.decode())
    flow = mqtt_password_flow(device_key, amqtt_stack.broker_url, tls_server_end_point(proxy_der))
    request = next(flow)
    response = httpx.post(
        amqtt_stack.verifier.url + request.path, json=request.to_json(),
        verify=amqtt_stack.tls_context(),
    )
    try:
        flow.send(response.json())
    except StopIteration as done:
        password = str(done.value)

    assert jwt.decode(password, options={"verify_signature": False})["cb"] != b64url_encode(
        broker_binding(amqtt_stack)
    )
    assert raw_connect(amqtt_stack, device_id, password) == NOT_AUTHORIZED
