"""MQTT login through RabbitMQ, whose HTTP auth backend calls the verifier's webhook.

RabbitMQ 3.10 (Debian) with rabbitmq_mqtt and rabbitmq_auth_backend_http; the verifier runs under
uvicorn. One node and one verifier serve the whole module, because a RabbitMQ start takes about
9 s; the restart and outage tests run last and bring both back.
"""

from __future__ import annotations

import queue
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import paho.mqtt.client as mqtt
import pytest
from fixtures_login import RabbitStack
from paho.mqtt.enums import CallbackAPIVersion

from device_sdk.auth import challenge_flow, device_id_of, mqtt_password_flow
from device_sdk.auth.assertion import new_jti, sign_assertion
from device_sdk.auth.challenge import Challenge
from device_sdk.mqtt import Backoff, ConnectAttempt, DeviceMqttClient, Outcome

pytestmark = pytest.mark.slow

# RabbitMQ 3.10 rejects a login with MQTT 3.1.1 CONNACK 4, which paho 2 reports as 134.
BAD_USERNAME_OR_PASSWORD = 134


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def connected(client: DeviceMqttClient) -> list[ConnectAttempt]:
    return [attempt for attempt in client.attempts if attempt.outcome == Outcome.CONNECTED]


def fetch_challenge(stack: RabbitStack, key: Any) -> Challenge:
    flow = challenge_flow(key, stack.broker_url)
    request = next(flow)
    response = httpx.post(stack.verifier.url + request.path, json=request.to_json())
    assert response.status_code == 200, response.text
    try:
        flow.send(response.json())
    except StopIteration as done:
        challenge: Challenge = done.value[0]
        return challenge
    raise AssertionError("challenge flow did not finish")


def mint_password(stack: RabbitStack, key: Any) -> str:
    """Run the MQTT password flow by hand, as a device without this SDK's client would."""
    flow = mqtt_password_flow(key, stack.broker_url, None)
    request = next(flow)
    response = httpx.post(stack.verifier.url + request.path, json=request.to_json())
    try:
        flow.send(response.json())
    except StopIteration as done:
        return str(done.value)
    raise AssertionError("password flow did not finish")


def raw_connect(stack: RabbitStack, username: str, password: str) -> int:
    """CONNECT with plain paho and return the CONNACK reason code value."""
    codes: queue.Queue[int] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}")
    client.username_pw_set(username, password)
    client.on_connect = lambda _c, _u, _f, reason, _p: codes.put(reason.value)
    client.connect("127.0.0.1", stack.rabbit.mqtt_port)
    client.loop_start()
    try:
        return codes.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def device_client(stack: RabbitStack, key: Any, **options: Any) -> DeviceMqttClient:
    options.setdefault("backoff", Backoff(base=0.2, cap=2.0))
    return DeviceMqttClient(key, stack.broker_url, verifier_url=stack.verifier.url, **options)


def test_publish_and_receive_qos1(rabbit_stack: RabbitStack, device_key: Any) -> None:
    rabbit_stack.verifier.enroll(device_key)
    client = device_client(rabbit_stack, device_key)
    received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscribed: queue.Queue[int] = queue.Queue()
    client.paho.on_message = lambda _c, _u, message: received.put(message)
    client.paho.on_subscribe = lambda _c, _u, _mid, codes, _p: subscribed.put(codes[0].value)
    client.on_connect = lambda device, _present: device.paho.subscribe("devices/qos1", qos=1)

    client.start()
    try:
        assert client.wait_connected(15)
        assert subscribed.get(timeout=10) == 1
        info = client.paho.publish("devices/qos1", b"hello", qos=1)
        info.wait_for_publish(10)
        message = received.get(timeout=10)
    finally:
        client.stop()

    assert info.is_published()
    assert message.payload == b"hello"
    assert message.qos == 1
    attempt = connected(client)[0]
    assert attempt.nonce is not None
    assert attempt.cb is None


def test_username_is_device_id(rabbit_stack: RabbitStack, device_key: Any) -> None:
    device_id = rabbit_stack.verifier.enroll(device_key)
    client = device_client(rabbit_stack, device_key)

    attempt = client.connect_once()
    client.disconnect()

    assert attempt.outcome == Outcome.CONNECTED
    assert client.paho.username == device_id
    assert client.paho.password is None


def test_wrong_key_refused_by_broker(
    rabbit_stack: RabbitStack, device_key: Any, software_key: Any
) -> None:
    # An attacker knows the device id and can fetch its challenge, but signs with another key.
    device_id = rabbit_stack.verifier.enroll(device_key)
    challenge = fetch_challenge(rabbit_stack, device_key)
    now = challenge.server_time
    claims = {
        "iss": device_id, "sub": device_id, "aud": rabbit_stack.broker_url, "iat": now,
        "exp": now + 60, "jti": new_jti(), "nonce": challenge.nonce,
    }
    forged = sign_assertion(software_key, claims, device_id=device_id)

    assert raw_connect(rabbit_stack, device_id, forged) == BAD_USERNAME_OR_PASSWORD
    assert "reason=bad_signature" in rabbit_stack.verifier.log_text()


def test_replayed_token_refused_by_broker(rabbit_stack: RabbitStack, device_key: Any) -> None:
    device_id = rabbit_stack.verifier.enroll(device_key)
    password = mint_password(rabbit_stack, device_key)

    first = raw_connect(rabbit_stack, device_id, password)
    replay = raw_connect(rabbit_stack, device_id, password)

    assert first == 0
    assert replay == BAD_USERNAME_OR_PASSWORD
    jti = jwt.decode(password, options={"verify_signature": False})["jti"]
    log = rabbit_stack.verifier.log_text()
    assert f"jti={jti}" in log
    assert "reason=unknown_nonce" in log or "reason=replayed" in log


def test_unknown_device_mints_once_more_then_backs_off(
    rabbit_stack: RabbitStack, software_key: Any
) -> None:
    client = device_client(
        rabbit_stack, software_key, backoff=Backoff(base=0.2, cap=0.4, rng=random.Random(2))
    )
    client.start()
    try:
        wait_for(lambda: len(client.attempts) >= 3, 10, "three refused attempts")
    finally:
        client.stop()

    first, second, third = list(client.attempts)[:3]
    expected = random.Random(2)
    assert [a.outcome for a in (first, second, third)] == [Outcome.NOT_AUTHORISED] * 3
    assert first.delay == 0.0
    assert second.delay == expected.uniform(0.0, 0.2)
    assert third.delay == expected.uniform(0.0, 0.4)
    assert first.detail.startswith("challenge request: the verifier rejected the device (HTTP 401)")


def test_broker_restart_reconnects_with_new_token(
    rabbit_stack: RabbitStack, device_key: Any, software_key: Any
) -> None:
    # Assertions live 2 s, the session far longer: the reconnect after the restart needs a new
    # one. The subscriber keeps its session (clean_session=False), so QoS 1 messages published
    # while it was away wait in its queue, and paho resends the publisher's unacknowledged ones.
    rabbit_stack.verifier.enroll(device_key)
    rabbit_stack.verifier.enroll(software_key)
    topic = f"devices/restart/{uuid.uuid4().hex[:8]}"
    subscriber = device_client(
        rabbit_stack, device_key, client_id=f"sub-{uuid.uuid4().hex[:8]}", assertion_lifetime=2
    )
    publisher = device_client(
        rabbit_stack, software_key, client_id=f"pub-{uuid.uuid4().hex[:8]}", assertion_lifetime=2
    )
    received: set[bytes] = set()
    subscribed: queue.Queue[int] = queue.Queue()
    subscriber.paho.on_message = lambda _c, _u, message: received.add(message.payload)
    subscriber.paho.on_subscribe = lambda _c, _u, _mid, codes, _p: subscribed.put(codes[0].value)
    subscriber.on_connect = lambda device, _present: device.paho.subscribe(topic, qos=1)

    subscriber.start()
    publisher.start()
    try:
        assert subscriber.wait_connected(15)
        assert publisher.wait_connected(15)
        assert subscribed.get(timeout=10) == 1
        sent = [f"message {n}".encode() for n in range(30)]
        for payload in sent[:10]:
            publisher.paho.publish(topic, payload, qos=1)
        wait_for(lambda: len(received) == 10, 10, "the first 10 messages")
        # Let the first assertions expire while the sessions go on.
        time.sleep(2.5)

        rabbit_stack.rabbit.stop()
        for payload in sent[10:20]:
            publisher.paho.publish(topic, payload, qos=1)
        rabbit_stack.rabbit.start()
        for payload in sent[20:]:
            publisher.paho.publish(topic, payload, qos=1)

        wait_for(lambda: len(connected(subscriber)) >= 2, 30, "the subscriber to reconnect")
        wait_for(lambda: len(connected(publisher)) >= 2, 30, "the publisher to reconnect")
        wait_for(lambda: len(received) == 30, 30, "all 30 messages")
    finally:
        subscriber.stop()
        publisher.stop()

    assert received == set(sent)
    for client in (subscriber, publisher):
        before, after = connected(client)[0], connected(client)[-1]
        assert after.jti != before.jti
        assert after.nonce != before.nonce
        lost = [a for a in client.attempts if a.outcome == Outcome.NETWORK]
        assert lost[0].detail == "connection lost"


def test_verifier_outage_backs_off_then_logs_in(
    rabbit_stack: RabbitStack, device_key: Any
) -> None:
    rabbit_stack.verifier.enroll(device_key)
    seed = 5
    client = device_client(
        rabbit_stack, device_key, backoff=Backoff(base=0.2, cap=1.6, rng=random.Random(seed))
    )

    rabbit_stack.verifier.stop()
    try:
        client.start()
        wait_for(lambda: len(client.attempts) >= 6, 30, "six failed attempts")
    finally:
        rabbit_stack.verifier.start()
    try:
        assert client.wait_connected(30)
    finally:
        client.stop()

    attempts = list(client.attempts)
    failed = [a for a in attempts if a.outcome == Outcome.VERIFIER_UNAVAILABLE]
    assert len(failed) >= 6
    assert attempts[len(failed)].outcome == Outcome.CONNECTED

    expected = random.Random(seed)
    for number, attempt in enumerate(failed):
        ceiling = min(1.6, 0.2 * 2**number)
        assert attempt.delay == expected.uniform(0.0, ceiling)
        assert attempt.detail.startswith(f"challenge request to {rabbit_stack.verifier.url}")
        gap = attempts[number + 1].started - attempt.started
        assert gap >= attempt.delay
    # Full jitter: the delays are not a fixed doubling, and their bound grows.
    delays = [a.delay for a in failed]
    assert len(set(delays)) == len(delays)
    assert max(delays[3:6]) > max(delays[0:2])
    assert device_id_of(device_key) == client.device_id
