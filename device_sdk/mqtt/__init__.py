"""MQTT login for devices: paho-mqtt with a freshly signed assertion on every CONNECT."""

from device_sdk.mqtt.backoff import Backoff
from device_sdk.mqtt.client import (
    AUTH_REFUSED_CODES,
    BrokerAddress,
    ConnectAttempt,
    DeviceMqttClient,
    Outcome,
)
from device_sdk.mqtt.password import MQTT_MAX_PASSWORD_BYTES, check_password_length

__all__ = [
    "AUTH_REFUSED_CODES",
    "MQTT_MAX_PASSWORD_BYTES",
    "Backoff",
    "BrokerAddress",
    "ConnectAttempt",
    "DeviceMqttClient",
    "Outcome",
    "check_password_length",
]
