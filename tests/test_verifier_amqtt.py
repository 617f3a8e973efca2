"""The amqtt authentication plugin: an embedded broker checks MQTT logins with the Verifier."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future

import paho.mqtt.client as mqtt
import pytest
from fixtures_services import HOST, free_port
from fixtures_verifier import NONCELESS_BROKER, PLAIN_BROKER, Device, enroll

from device_sdk.auth import Challenge, build_assertion
from device_sdk.errors import ConfigError
from device_sdk.verifier import Verifier
from device_sdk.verifier.amqtt_plugin import PLUGIN_PATH, broker_config

# paho 2 reports MQTT 3.1.1 CONNACK code 5 as reason code 135.
NOT_AUTHORIZED = 135
AUDIT_LOGGER = "device_sdk.verifier.audit"


class EmbeddedBroker:
    """An amqtt broker running on its own event loop in a background thread."""

    def __init__(self, verifier: Verifier, audience: str | None = None) -> None:
        from amqtt.broker import Broker

        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.broker = self.run(self._create(Broker, verifier, audience))
        self.run(self.broker.start())

    async def _create(self, broker_class: type, verifier: Verifier, audience: str | None) -> object:
        # amqtt binds the broker to the running loop, so it is created on that loop.
        return broker_class(broker_config(verifier, host=HOST, port=self.port, audience=audience))

    def run(self, coroutine: object) -> object:
        future: Future[object] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)  # type: ignore[arg-type]
        return future.result(timeout=30)

    def stop(self) -> None:
        self.run(self.broker.shutdown())  # type: ignore[attr-defined]
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def embedded_broker(verifier: Verifier) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(verifier)
    yield broker
    broker.stop()


def connect(port: int, username: str | None, password: str | None) -> int:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    if username is not None:
        client.username_pw_set(username, password)
    result: dict[str, int] = {}
    done = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        result["code"] = reason_code.value
        done.set()

    client.on_connect = on_connect
    client.connect(HOST, port, keepalive=10)
    client.loop_start()
    try:
        assert done.wait(15), "no CONNACK within 15 s"
    finally:
        client.disconnect()
        client.loop_stop()
    return result["code"]


def password_for(verifier: Verifier, device: Device) -> str:
    challenge = Challenge.from_json(verifier.issue_challenge(device.device_id, PLAIN_BROKER))
    return build_assertion(device.key, challenge, channel_binding=None)


def test_valid_assertion_connects(
    embedded_broker: EmbeddedBroker, verifier: Verifier, device: Device
) -> None:
    password = password_for(verifier, device)

    assert connect(embedded_broker.port, device.device_id, password) == 0


def test_replayed_password_refused(
    embedded_broker: EmbeddedBroker,
    verifier: Verifier,
    device: Device,
    caplog: pytest.LogCaptureFixture,
) -> None:
    password = password_for(verifier, device)
    assert connect(embedded_broker.port, device.device_id, password) == 0

    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        code = connect(embedded_broker.port, device.device_id, password)

    assert code == NOT_AUTHORIZED
    lines = [r.getMessage() for r in caplog.records if r.name == AUDIT_LOGGER]
    assert any("reason=replayed" in line and "client=127.0.0.1" in line for line in lines)


def test_broker_with_audience_refuses_other_broker_password(
    verifier: Verifier, device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    # This broker is the verifier's NONCELESS_BROKER; the password was minted for PLAIN_BROKER.
    broker = EmbeddedBroker(verifier, audience=NONCELESS_BROKER)
    try:
        with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
            code = connect(broker.port, device.device_id, password_for(verifier, device))
    finally:
        broker.stop()

    assert code == NOT_AUTHORIZED
    lines = [r.getMessage() for r in caplog.records if r.name == AUDIT_LOGGER]
    assert any("reason=wrong_audience" in line for line in lines)


def test_broker_audience_must_be_served(verifier: Verifier) -> None:
    from amqtt.broker import Broker
    from amqtt.errors import PluginInitError

    async def create() -> object:
        return Broker(broker_config(verifier, host=HOST, port=0, audience="mqtt://typo.test:1883"))

    with pytest.raises(PluginInitError) as caught:
        asyncio.run(create())
    cause = caught.value.__cause__
    assert isinstance(cause, ConfigError)
    assert "audience 'mqtt://typo.test:1883' is not a broker audience of the verifier" in str(
        cause
    )


def test_username_must_match_device(
    embedded_broker: EmbeddedBroker, verifier: Verifier, device: Device
) -> None:
    other = enroll(verifier)

    assert connect(embedded_broker.port, other.device_id, password_for(verifier, device)) == (
        NOT_AUTHORIZED
    )


def test_missing_credentials_refused(embedded_broker: EmbeddedBroker, device: Device) -> None:
    assert connect(embedded_broker.port, None, None) == NOT_AUTHORIZED
    assert connect(embedded_broker.port, device.device_id, None) == NOT_AUTHORIZED


def test_revoked_device_refused(
    embedded_broker: EmbeddedBroker, verifier: Verifier, device: Device
) -> None:
    password = password_for(verifier, device)
    verifier.revoke(device.device_id)

    assert connect(embedded_broker.port, device.device_id, password) == NOT_AUTHORIZED


def test_plugin_requires_verifier_object() -> None:
    from amqtt.broker import Broker
    from amqtt.errors import PluginInitError

    async def start() -> None:
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{free_port()}"}},
            "plugins": {PLUGIN_PATH: {"verifier": "not a verifier"}},
        }
        Broker(config)

    with pytest.raises(PluginInitError) as raised:
        asyncio.run(start())
    assert "needs a Verifier object" in str(raised.value.__cause__)
