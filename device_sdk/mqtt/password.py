"""Limits on the MQTT CONNECT password that carries a device assertion."""

from __future__ import annotations

from device_sdk.errors import PasswordTooLongError

MQTT_MAX_PASSWORD_BYTES = 65535
"""MQTT 3.1.1 and 5 prefix the password with a two-byte length, so it holds at most 65535 bytes."""


def check_password_length(password: bytes, broker_limit: int | None = None) -> None:
    """Raise :class:`PasswordTooLongError` when ``password`` exceeds the MQTT or broker limit.

    ``broker_limit`` is a smaller limit that a broker is configured with, in bytes; None means the
    MQTT limit alone applies.
    """
    limit = MQTT_MAX_PASSWORD_BYTES
    source = "the MQTT limit"
    if broker_limit is not None and broker_limit < limit:
        limit = broker_limit
        source = "the configured broker limit"
    if len(password) > limit:
        raise PasswordTooLongError(
            f"MQTT password of {len(password)} bytes exceeds {source} of {limit} bytes; use a "
            "smaller key type (ES256 assertions take about 600 bytes) or raise the broker limit",
            length=len(password),
            limit=limit,
        )
