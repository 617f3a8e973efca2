"""The device topic policy: with --device-topic-prefix a device may use only its own topics.

Checked through RabbitMQ's HTTP auth backend (topic checks on SUBSCRIBE and PUBLISH) and the
EMQX-style authorizer webhook against a real verifier, and through the amqtt plugin.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient
from fixtures_login import RabbitStack, serve_verifier
from fixtures_services import HOST, UvicornFactory, free_port
from fixtures_verifier import PLAIN_BROKER, ManualClock, enroll, make_verifier
from paho.mqtt.enums import CallbackAPIVersion

from device_sdk.auth import Challenge, build_assertion, device_id_of, mqtt_password_flow
from device_sdk.errors import ConfigError
from device_sdk.verifier import Verifier, VerifierConfig
from device_sdk.verifier.amqtt_plugin import broker_config
from device_sdk.verifier.app import create_app

pytestmark = pytest.mark.slow

PREFIX = "devices/{device_id}/"
RABBITMQ_WEBHOOK_PATH = "/v1/broker/auth/rabbitmq"
SUBACK_FAILURE = 128
# paho 2 reports MQTT 3.1.1 CONNACK code 5 as reason code 135.
NOT_AUTHORIZED = 135
AUDIT_LOGGER = "device_sdk.verifier.audit"


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("devices/D/telemetry", True),
        ("devices/D/#", True),
        ("devices/D/", True),
        ("devices/D", False),
        ("devices/E/telemetry", False),
        ("devices/+/telemetry", False),
        ("#", False),
        ("devices/DD/x", False),
    ],
)
def test_topic_allowed(topic: str, allowed: bool) -> None:
    config = VerifierConfig(issuer="http://127.0.0.1:8080", device_topic_prefix=PREFIX)
    assert config.topic_allowed("D", topic) is allowed


def test_no_prefix_allows_any_topic() -> None:
    config = VerifierConfig(issuer="http://127.0.0.1:8080")
    assert config.topic_allowed("D", "#")
    assert config.client_id_allowed("D", "any-client")


@pytest.mark.parametrize(
    ("client_id", "allowed"),
    [("D", True), ("D-sensor", True), ("E", False), ("", False), (None, False)],
)
def test_client_id_must_start_with_device_id(client_id: str | None, allowed: bool) -> None:
    config = VerifierConfig(issuer="http://127.0.0.1:8080", device_topic_prefix=PREFIX)
    assert config.client_id_allowed("D", client_id) is allowed


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("devices/", "must contain the field {device_id}, with no other field"),
        ("devices/{id}/", "must contain the field {device_id}, with no other field"),
        ("devices/{{device_id}}/", "must contain the field {device_id}, with no other field"),
        ("devices/{device_id[3]}/", "must contain the field {device_id}, with no other field"),
        ("devices/{device_id.upper}/", "must contain the field {device_id}, with no other field"),
        ("d/{device_id}{device_id:>50}/", "must contain the field {device_id}, with no other"),
        ("devices/{device_id!r}/", "must contain the field {device_id}, with no other field"),
        ("devices/{device_id", "must contain the field {device_id}, with no other field"),
        ("devices/}}/{device_id}/", "contains a literal brace"),
        ("devices/{device_id}", "must end with '/'"),
        ("+/{device_id}/", "starts with '$' or contains an MQTT wildcard"),
        ("$SYS/{device_id}/", "starts with '$' or contains an MQTT wildcard"),
        ("a\x01/{device_id}/", "starts with '$' or contains an MQTT wildcard"),
    ],
)
def test_invalid_prefix_rejected(prefix: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        VerifierConfig(issuer="http://127.0.0.1:8080", device_topic_prefix=prefix)
    assert message in str(caught.value)


# The webhooks, in process


@pytest.fixture
def policy_verifier(tmp_path: Path, clock: ManualClock) -> Iterator[Verifier]:
    instance = make_verifier(tmp_path, clock, device_topic_prefix=PREFIX)
    yield instance
    instance.close()


def test_rabbitmq_topic_check(
    policy_verifier: Verifier, caplog: pytest.LogCaptureFixture
) -> None:
    device = enroll(policy_verifier)
    other = enroll(policy_verifier)
    form = {"username": device.device_id, "vhost": "/", "resource": "topic",
            "name": "amq.topic", "permission": "write"}
    keys = {
        "own": f"devices.{device.device_id}.telemetry",
        "own_filter": f"devices.{device.device_id}.*",
        "other": f"devices.{other.device_id}.telemetry",
        "everything": "#",
        "missing": None,
    }
    answers = {}
    with TestClient(create_app(policy_verifier)) as broker:
        for name, key in keys.items():
            data = form if key is None else {**form, "routing_key": key}
            answers[name] = broker.post(RABBITMQ_WEBHOOK_PATH + "/topic", data=data).text

    assert answers == {
        "own": "allow", "own_filter": "allow", "other": "deny", "everything": "deny",
        "missing": "deny",
    }
    assert f"reason=wrong_topic device_id={device.device_id}" in caplog.text


def test_rabbitmq_login_with_other_client_id_denied(
    policy_verifier: Verifier, caplog: pytest.LogCaptureFixture
) -> None:
    device = enroll(policy_verifier)
    victim = enroll(policy_verifier)
    challenge = Challenge.from_json(policy_verifier.issue_challenge(device.device_id, PLAIN_BROKER))
    password = build_assertion(device.key, challenge, channel_binding=None)
    form = {"username": device.device_id, "password": password, "vhost": "/"}
    with TestClient(create_app(policy_verifier)) as broker:
        takeover = broker.post(
            RABBITMQ_WEBHOOK_PATH + "/user", data={**form, "client_id": victim.device_id}
        )
        own = broker.post(
            RABBITMQ_WEBHOOK_PATH + "/user", data={**form, "client_id": device.device_id}
        )

    assert takeover.text == "deny"
    assert f"reason=wrong_client_id device_id={device.device_id}" in caplog.text
    # The refusal came before the password check, so the nonce was still there to spend.
    assert own.text == "allow"


def test_emqx_authorizer(policy_verifier: Verifier) -> None:
    device = enroll(policy_verifier)
    own = f"devices/{device.device_id}/cmd"
    with TestClient(create_app(policy_verifier)) as broker:
        allowed = broker.post(
            "/v1/broker/authz/emqx",
            json={"username": device.device_id, "topic": own, "action": "subscribe"},
        )
        denied = broker.post(
            "/v1/broker/authz/emqx",
            json={"username": device.device_id, "topic": "devices/x/cmd", "action": "publish"},
        )
        unknown = broker.post(
            "/v1/broker/authz/emqx",
            json={"username": "u" * 43, "topic": f"devices/{'u' * 43}/a", "action": "publish"},
        )
    assert allowed.json() == {"result": "allow"}
    assert denied.json() == {"result": "deny"}
    assert unknown.json() == {"result": "deny"}


# amqtt, through the plugin


class AmqttBroker:
    """An amqtt broker with the verifier's plugins, on its own event loop in a thread."""

    def __init__(self, verifier: Verifier) -> None:
        from amqtt.broker import Broker

        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def create() -> Any:
            return Broker(broker_config(verifier, host=HOST, port=self.port))

        self.broker = self.run(create())
        self.run(self.broker.start())

    def run(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout=30)

    def stop(self) -> None:
        self.run(self.broker.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def subscribe_and_publish(
    port: int, username: str, password: str, own: str, other: str
) -> tuple[list[int], list[str]]:
    """Subscribe to ``own``/# and ``other``/#, publish to other then own; return SUBACK codes
    and the topics received once the message to ``own`` has arrived."""
    client_id = f"{username}-{uuid.uuid4().hex[:8]}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(username, password)
    connected: queue.Queue[int] = queue.Queue()
    subacks: queue.Queue[list[int]] = queue.Queue()
    received: queue.Queue[str] = queue.Queue()
    client.on_connect = lambda _c, _u, _f, reason, _p: connected.put(reason.value)
    client.on_subscribe = lambda _c, _u, _m, codes, _p: subacks.put([c.value for c in codes])
    client.on_message = lambda _c, _u, message: received.put(message.topic)
    client.connect(HOST, port)
    client.loop_start()
    try:
        assert connected.get(timeout=15) == 0
        client.subscribe([(own + "#", 1), (other + "#", 1)])
        codes = subacks.get(timeout=15)
        client.publish(other + "x", b"not allowed", qos=1).wait_for_publish(10)
        client.publish(own + "x", b"allowed", qos=1).wait_for_publish(10)
        topics = [received.get(timeout=15)]
        while not received.empty():
            topics.append(received.get_nowait())
    finally:
        client.disconnect()
        client.loop_stop()
    return codes, topics


def test_amqtt_device_limited_to_own_topics(policy_verifier: Verifier) -> None:
    device = enroll(policy_verifier)
    challenge = Challenge.from_json(policy_verifier.issue_challenge(device.device_id, PLAIN_BROKER))
    password = build_assertion(device.key, challenge, channel_binding=None)
    broker = AmqttBroker(policy_verifier)
    try:
        codes, topics = subscribe_and_publish(
            broker.port, device.device_id, password,
            f"devices/{device.device_id}/", "devices/someone-else/",
        )
    finally:
        broker.stop()

    assert codes == [1, SUBACK_FAILURE]
    assert topics == [f"devices/{device.device_id}/x"]


def connack_code(
    port: int, username: str, password: str, client_id: str, will_topic: str | None = None
) -> int:
    """CONNECT with plain paho and return the CONNACK reason code value."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311, reconnect_on_failure=False)
    client.username_pw_set(username, password)
    if will_topic is not None:
        client.will_set(will_topic, b"gone", qos=1, retain=True)
    codes: queue.Queue[int] = queue.Queue()
    client.on_connect = lambda _c, _u, _f, reason, _p: codes.put(reason.value)
    client.connect(HOST, port)
    client.loop_start()
    try:
        return codes.get(timeout=15)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize(
    "case", ["other-client-id", "will-outside", "own"]
)
def test_amqtt_connect_checks(
    policy_verifier: Verifier, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    device = enroll(policy_verifier)
    victim = enroll(policy_verifier)
    challenge = Challenge.from_json(policy_verifier.issue_challenge(device.device_id, PLAIN_BROKER))
    password = build_assertion(device.key, challenge, channel_binding=None)
    client_id = victim.device_id if case == "other-client-id" else device.device_id
    will = f"devices/{victim.device_id}/cmd" if case == "will-outside" else None
    broker = AmqttBroker(policy_verifier)
    try:
        code = connack_code(broker.port, device.device_id, password, client_id, will)
    finally:
        broker.stop()

    expected = {"other-client-id": (NOT_AUTHORIZED, "reason=wrong_client_id"),
                "will-outside": (NOT_AUTHORIZED, "reason=wrong_topic"),
                "own": (0, None)}[case]
    assert code == expected[0]
    if expected[1] is not None:
        assert f"{expected[1]} device_id={device.device_id}" in caplog.text


# RabbitMQ, through the HTTP auth backend


@pytest.fixture(scope="module")
def policy_rabbit_stack(
    rabbitmq_factory: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RabbitStack]:
    directory = tmp_path_factory.mktemp("rabbit-topics")
    port = free_port()
    rabbit = rabbitmq_factory(f"http://{HOST}:{port}{RABBITMQ_WEBHOOK_PATH}")
    factory = UvicornFactory(directory)
    try:
        verifier = serve_verifier(
            factory, directory, port=port, broker_audiences=(rabbit.mqtt_url,),
            extra_args=("--device-topic-prefix", PREFIX),
        )
        yield RabbitStack(rabbit, verifier)
    finally:
        factory.stop_all()


def test_rabbitmq_device_limited_to_own_topics(
    policy_rabbit_stack: RabbitStack, device_key: Any
) -> None:
    # RabbitMQ 3.10 closes the connection on a refused subscription, where amqtt sends a SUBACK
    # failure code.
    stack = policy_rabbit_stack
    device_id = stack.verifier.enroll(device_key)
    flow = mqtt_password_flow(device_key, stack.broker_url, None)
    request = next(flow)
    response = httpx.post(stack.verifier.url + request.path, json=request.to_json(), timeout=10)
    with pytest.raises(StopIteration) as done:
        flow.send(response.json())
    password = str(done.value.value)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id,
                         reconnect_on_failure=False)
    client.username_pw_set(device_id, password)
    connected: queue.Queue[int] = queue.Queue()
    subacks: queue.Queue[list[int]] = queue.Queue()
    received: queue.Queue[str] = queue.Queue()
    disconnected = threading.Event()
    client.on_connect = lambda _c, _u, _f, reason, _p: connected.put(reason.value)
    client.on_subscribe = lambda _c, _u, _m, codes, _p: subacks.put([c.value for c in codes])
    client.on_message = lambda _c, _u, message: received.put(message.topic)
    client.on_disconnect = lambda *_args: disconnected.set()
    client.connect(HOST, stack.rabbit.mqtt_port)
    client.loop_start()
    try:
        assert connected.get(timeout=15) == 0
        client.subscribe(f"devices/{device_id}/#", qos=1)
        own_codes = subacks.get(timeout=15)
        client.publish(f"devices/{device_id}/x", b"allowed", qos=1).wait_for_publish(10)
        own_topic = received.get(timeout=15)
        client.subscribe("devices/other/#", qos=1)
        closed = disconnected.wait(15)
    finally:
        client.disconnect()
        client.loop_stop()

    assert device_id == device_id_of(device_key)
    assert own_codes == [1]
    assert own_topic == f"devices/{device_id}/x"
    assert closed
    assert subacks.empty()
    assert (
        f"reason=wrong_topic device_id={device_id} client=127.0.0.1 topic=devices/other/# "
        "action=read"
    ) in stack.verifier.log_text()
