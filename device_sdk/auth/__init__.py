"""The device login protocol, free of any transport: challenge, assertion, channel binding, flows.

Works with any ``cryptography`` private key, hardware-held or not. The wire format is described
in ``docs/protocol.md``.
"""

from device_sdk.auth.assertion import (
    ASSERTION_TYPE,
    MAX_ASSERTION_LIFETIME,
    algorithm_for_key,
    build_assertion,
    device_id_of,
    is_tls_audience,
)
from device_sdk.auth.challenge import MAX_CHALLENGE_LIFETIME, NONCE_BYTES, Challenge, ServerClock
from device_sdk.auth.channel_binding import tls_server_end_point
from device_sdk.auth.encoding import b64url_decode, b64url_encode
from device_sdk.auth.flows import (
    AccessToken,
    Answer,
    ChallengeRequest,
    ChannelBinding,
    ErrorAnswer,
    TokenRequest,
    challenge_flow,
    error_for_answer,
    login_flow,
    mqtt_password_flow,
    mqtt_password_without_nonce,
)

__all__ = [
    "ASSERTION_TYPE",
    "MAX_ASSERTION_LIFETIME",
    "MAX_CHALLENGE_LIFETIME",
    "NONCE_BYTES",
    "AccessToken",
    "Answer",
    "Challenge",
    "ChallengeRequest",
    "ChannelBinding",
    "ErrorAnswer",
    "ServerClock",
    "TokenRequest",
    "algorithm_for_key",
    "b64url_decode",
    "b64url_encode",
    "build_assertion",
    "challenge_flow",
    "device_id_of",
    "error_for_answer",
    "is_tls_audience",
    "login_flow",
    "mqtt_password_flow",
    "mqtt_password_without_nonce",
    "tls_server_end_point",
]
