"""Backoff, password limits and broker URLs of the MQTT login, without a broker."""

from __future__ import annotations

import random

import pytest

from device_sdk.errors import ConfigError, PasswordTooLongError
from device_sdk.mqtt import (
    MQTT_MAX_PASSWORD_BYTES,
    Backoff,
    BrokerAddress,
    check_password_length,
)


def test_backoff_delays_match_seeded_full_jitter() -> None:
    backoff = Backoff(base=0.5, cap=4.0, rng=random.Random(7))
    expected_rng = random.Random(7)
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]

    delays = [backoff.next_delay() for _ in ceilings]

    assert delays == [expected_rng.uniform(0.0, ceiling) for ceiling in ceilings]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert 0.0 <= delay <= ceiling


def test_backoff_ceiling_grows_then_caps() -> None:
    backoff = Backoff(base=0.25, cap=3.0)

    assert [backoff.ceiling(n) for n in range(6)] == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.ceiling(10_000) == 3.0


def test_backoff_reset_starts_over() -> None:
    backoff = Backoff(base=1.0, cap=8.0, rng=random.Random(1))
    for _ in range(5):
        backoff.next_delay()

    backoff.reset()

    assert backoff.attempt == 0
    assert backoff.next_delay() <= 1.0


def test_backoff_jitter_spreads_delays() -> None:
    backoff = Backoff(base=1.0, cap=1.0, rng=random.Random(3))

    delays = {round(backoff.next_delay(), 6) for _ in range(50)}

    assert len(delays) == 50
    assert min(delays) < 0.2
    assert max(delays) > 0.8


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_backoff_rejects_invalid_bounds(base: float, cap: float) -> None:
    with pytest.raises(ConfigError, match="invalid backoff"):
        Backoff(base=base, cap=cap)


def test_password_at_mqtt_limit_passes() -> None:
    check_password_length(b"x" * MQTT_MAX_PASSWORD_BYTES)


def test_password_over_mqtt_limit_names_both_lengths() -> None:
    with pytest.raises(PasswordTooLongError) as caught:
        check_password_length(b"x" * 65536)

    assert caught.value.length == 65536
    assert caught.value.limit == 65535
    assert str(caught.value).startswith(
        "MQTT password of 65536 bytes exceeds the MQTT limit of 65535 bytes"
    )


def test_password_over_broker_limit_names_both_lengths() -> None:
    with pytest.raises(PasswordTooLongError) as caught:
        check_password_length(b"x" * 600, broker_limit=512)

    assert caught.value.length == 600
    assert caught.value.limit == 512
    assert "exceeds the configured broker limit of 512 bytes" in str(caught.value)


def test_broker_limit_above_mqtt_limit_is_ignored() -> None:
    with pytest.raises(PasswordTooLongError) as caught:
        check_password_length(b"x" * 70000, broker_limit=100000)

    assert caught.value.limit == MQTT_MAX_PASSWORD_BYTES


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://127.0.0.1:1883", "127.0.0.1", 1883, False),
        ("mqtts://broker.example.com", "broker.example.com", 8883, True),
        ("mqtt://localhost", "localhost", 1883, False),
        ("MQTTS://127.0.0.1:9000/", "127.0.0.1", 9000, True),
    ],
)
def test_broker_address_parses(url: str, host: str, port: int, tls: bool) -> None:
    address = BrokerAddress.parse(url)

    assert (address.url, address.host, address.port, address.tls) == (url, host, port, tls)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://127.0.0.1", "the scheme must be mqtt or mqtts"),
        ("mqtt://", "the host is missing"),
        ("mqtt://127.0.0.1:1883/topic", "only scheme, host and port are allowed"),
        ("mqtt://127.0.0.1:port", "the port is not a number"),
        ("mqtt://broker.example.com:1883", "uses plain mqtt to a host that is not loopback"),
        ("mqtt://10.0.0.5", "use mqtts://10.0.0.5:8883"),
    ],
)
def test_broker_address_rejects(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BrokerAddress.parse(url)
