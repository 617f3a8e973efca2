"""The generator flows, driven in process against a real Verifier."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
from fixtures_verifier import (
    HTTP_CB,
    ISSUER,
    NONCELESS_BROKER,
    PLAIN_BROKER,
    TOKEN_URL,
    Device,
    decode_part,
)

from device_sdk.auth import (
    AccessToken,
    ChallengeRequest,
    ErrorAnswer,
    TokenRequest,
    error_for_answer,
    login_flow,
    mqtt_password_flow,
    mqtt_password_without_nonce,
)
from device_sdk.errors import LoginError, ProtocolError, TransportError, VerificationError
from device_sdk.verifier import Verifier


def drive(flow: Generator[Any, Any, Any], verifier: Verifier) -> Any:
    """Play the transport: serve each request of the flow from the verifier, as the app would."""
    request = next(flow)
    try:
        while True:
            try:
                if isinstance(request, ChallengeRequest):
                    answer = verifier.issue_challenge(
                        request.device_id, request.audience, "192.0.2.1"
                    )
                else:
                    verified = verifier.verify_assertion(request.assertion, audience_kind="http")
                    answer = verifier.issue_access_token(verified)
            except VerificationError as exc:
                status = 429 if exc.reason == "rate_limited" else 401
                answer = ErrorAnswer(status, {"error": "unauthorized"}, exc.retry_after)
            request = flow.send(answer)
    except StopIteration as done:
        return done.value


def test_login_flow_returns_access_token(verifier: Verifier, device: Device) -> None:
    token = drive(login_flow(device.key, ISSUER, TOKEN_URL, HTTP_CB), verifier)
    assert isinstance(token, AccessToken)
    assert token.expires_in == 300
    assert token.authorization == f"Bearer {token.token}"
    assert verifier.verify_access_token(token.token)["sub"] == device.device_id
    assert token.token not in repr(token)


def test_login_flow_requests(device: Device) -> None:
    flow = login_flow(device.key, ISSUER, TOKEN_URL, HTTP_CB)
    request = next(flow)
    assert request == ChallengeRequest(device.device_id, ISSUER)
    assert request.to_json() == {"device_id": device.device_id, "audience": ISSUER}
    assert request.path == "/v1/challenges"


def test_login_flow_channel_binding_callable(verifier: Verifier, device: Device) -> None:
    calls = []

    def binding() -> bytes:
        calls.append(1)
        return HTTP_CB

    assert isinstance(
        drive(login_flow(device.key, ISSUER, TOKEN_URL, binding), verifier), AccessToken
    )
    assert calls == [1]


def test_token_request_hides_assertion(verifier: Verifier, device: Device) -> None:
    flow = login_flow(device.key, ISSUER, TOKEN_URL, HTTP_CB)
    challenge_request = next(flow)
    request = flow.send(verifier.issue_challenge(challenge_request.device_id, ISSUER))
    assert isinstance(request, TokenRequest)
    assert request.url == TOKEN_URL
    assert request.assertion not in repr(request)
    assert request.to_json() == {"assertion": request.assertion}


def test_access_token_expiry() -> None:
    token = AccessToken("t", expires_in=300, expires_at_monotonic=1300.0)
    assert not token.expires_within(30, now=1000.0)
    assert token.expires_within(30, now=1271.0)


def test_revoked_device_login_fails(verifier: Verifier, device: Device) -> None:
    verifier.revoke(device.device_id)
    with pytest.raises(LoginError, match="HTTP 401") as caught:
        drive(login_flow(device.key, ISSUER, TOKEN_URL, HTTP_CB), verifier)
    assert caught.value.status_code == 401


def test_wrong_channel_binding_login_fails(verifier: Verifier, device: Device) -> None:
    with pytest.raises(LoginError) as caught:
        drive(login_flow(device.key, ISSUER, TOKEN_URL, b"\x00" * 32), verifier)
    assert caught.value.status_code == 401


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (ErrorAnswer(429, None, 7.0), LoginError, "try again after 7 s"),
        (ErrorAnswer(429), LoginError, "try again later"),
        (ErrorAnswer(401, {"error": "unauthorized"}), LoginError, "rejected the device"),
        (ErrorAnswer(403), LoginError, "HTTP 403"),
        (ErrorAnswer(422), LoginError, "rejected the request as invalid"),
        (ErrorAnswer(503), TransportError, "failed with HTTP 503"),
    ],
)
def test_error_responses_mapped(answer: ErrorAnswer, error: type[Exception], message: str) -> None:
    exception = error_for_answer(answer, "challenge request")
    assert type(exception) is error
    assert message in str(exception)
    assert str(exception).startswith("challenge request: ")


def test_rate_limit_answer_carries_retry_after(device: Device) -> None:
    flow = login_flow(device.key, ISSUER, TOKEN_URL, HTTP_CB)
    next(flow)
    with pytest.raises(LoginError) as caught:
        flow.send(ErrorAnswer(429, None, 12.0))
    assert caught.value.retry_after == 12.0
    assert caught.value.status_code == 429


def test_malformed_challenge_answer(device: Device) -> None:
    flow = login_flow(device.key, ISSUER, TOKEN_URL, HTTP_CB)
    next(flow)
    with pytest.raises(ProtocolError, match="invalid challenge"):
        flow.send({"nonce": "x"})


def test_challenge_for_other_audience_refused(verifier: Verifier, device: Device) -> None:
    flow = login_flow(device.key, ISSUER, TOKEN_URL, HTTP_CB)
    next(flow)
    answer = verifier.issue_challenge(device.device_id, PLAIN_BROKER)
    with pytest.raises(ProtocolError, match="returned a challenge for device"):
        flow.send(answer)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"token_type": "Bearer", "expires_in": 300}, "no access_token"),
        ({"access_token": "t", "token_type": "MAC", "expires_in": 300}, "is not Bearer"),
        ({"access_token": "t", "token_type": "Bearer", "expires_in": 0}, "not a positive integer"),
        ({"access_token": "t", "token_type": "Bearer", "expires_in": "300"}, "not a positive"),
        ({"access_token": "t", "token_type": "Bearer", "expires_in": True}, "not a positive"),
    ],
)
def test_malformed_token_answer(
    verifier: Verifier, device: Device, body: dict[str, Any], message: str
) -> None:
    flow = login_flow(device.key, ISSUER, TOKEN_URL, HTTP_CB)
    next(flow)
    flow.send(verifier.issue_challenge(device.device_id, ISSUER))
    with pytest.raises(ProtocolError, match=message):
        flow.send(body)


def test_non_object_answer_rejected(device: Device) -> None:
    flow = login_flow(device.key, ISSUER, TOKEN_URL, HTTP_CB)
    next(flow)
    with pytest.raises(ProtocolError, match="expected a JSON object, got list"):
        flow.send([])  # type: ignore[arg-type]


def test_mqtt_password_flow(verifier: Verifier, device: Device) -> None:
    flow = mqtt_password_flow(device.key, PLAIN_BROKER, None)
    request = next(flow)
    assert request == ChallengeRequest(device.device_id, PLAIN_BROKER)
    try:
        flow.send(verifier.issue_challenge(request.device_id, request.audience))
    except StopIteration as done:
        password = done.value
    claims = decode_part(password.split(".")[1])
    assert claims["aud"] == PLAIN_BROKER
    assert "htm" not in claims
    verified = verifier.verify_assertion(
        password, audience_kind="mqtt", expected_device_id=device.device_id
    )
    assert verified.audience == PLAIN_BROKER


def test_mqtt_password_without_nonce(verifier: Verifier, device: Device) -> None:
    password = mqtt_password_without_nonce(device.key, NONCELESS_BROKER, None)
    claims = decode_part(password.split(".")[1])
    assert "nonce" not in claims
    assert claims["exp"] - claims["iat"] == 30
    assert verifier.verify_assertion(password, audience_kind="mqtt").nonce is None


@pytest.mark.parametrize("lifetime", [0, 31])
def test_nonceless_lifetime_limited(device: Device, lifetime: int) -> None:
    with pytest.raises(ProtocolError, match="outside 1..30 s"):
        mqtt_password_without_nonce(device.key, NONCELESS_BROKER, None, lifetime=lifetime)


def test_nonceless_tls_needs_cb(device: Device) -> None:
    with pytest.raises(ProtocolError, match="pass the channel binding"):
        mqtt_password_without_nonce(device.key, "mqtts://broker.test:8883", None)
