"""Login flows as generators, driven by a transport adapter (the ``httpx.Auth`` pattern).

A flow yields the request it needs and receives the response through ``send()``: the decoded
JSON object of a 2xx response, or an :class:`ErrorAnswer` for any other status. It finishes by
returning its result (``StopIteration.value``). No sockets live here, so one flow serves HTTP,
MQTT, sync and async adapters alike. A driver looks like this::

    flow = login_flow(key, audience, token_url, channel_binding)
    request = next(flow)
    try:
        while True:
            answer = post_json(request.path, request.to_json())   # the adapter's own I/O
            request = flow.send(answer)
    except StopIteration as done:
        access_token = done.value
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

from device_sdk.auth.assertion import (
    PrivateKey,
    build_assertion,
    device_id_of,
    is_tls_audience,
    new_jti,
    sign_assertion,
)
from device_sdk.auth.challenge import Challenge, ServerClock
from device_sdk.auth.encoding import b64url_encode
from device_sdk.errors import LoginError, ProtocolError, TransportError

CHALLENGE_PATH = "/v1/challenges"
TOKEN_PATH = "/v1/token"  # noqa: S105 (a URL path, not a secret)

MAX_NONCELESS_LIFETIME = 30
"""Seconds an assertion without a challenge nonce may live at most."""

ChannelBinding = bytes | None | Callable[[], bytes | None]
"""The channel binding, or a callable that returns it once the challenge has arrived (an adapter
may learn the server certificate only from the connection that fetched the challenge)."""


@dataclass(frozen=True)
class ChallengeRequest:
    """Request a challenge: ``POST /v1/challenges`` on the verifier."""

    device_id: str
    audience: str
    method: str = "POST"
    path: str = CHALLENGE_PATH

    def to_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "audience": self.audience}


@dataclass(frozen=True)
class TokenRequest:
    """Exchange an assertion for an access token: ``POST`` to the token URL."""

    assertion: str = field(repr=False)
    url: str = ""
    method: str = "POST"
    path: str = TOKEN_PATH

    def to_json(self) -> dict[str, Any]:
        return {"assertion": self.assertion}


@dataclass(frozen=True)
class ErrorAnswer:
    """A non-2xx response, sent into a flow by the adapter in place of a JSON object.

    ``retry_after`` is the ``Retry-After`` header in seconds, when the server sent one.
    """

    status_code: int
    body: Any = None
    retry_after: float | None = None


Answer = Mapping[str, Any] | ErrorAnswer


@dataclass(frozen=True)
class AccessToken:
    """A bearer access token and when it expires on the device's monotonic clock."""

    token: str = field(repr=False)
    expires_in: int
    expires_at_monotonic: float
    token_type: str = "Bearer"  # noqa: S105 (a scheme name, not a secret)

    def expires_within(self, seconds: float, now: float | None = None) -> bool:
        """Tell whether the token expires within ``seconds`` (re-login before that)."""
        current = time.monotonic() if now is None else now
        return current + seconds >= self.expires_at_monotonic

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value. Never log it."""
        return f"Bearer {self.token}"


def error_for_answer(answer: ErrorAnswer, step: str) -> Exception:
    """Map a non-2xx response of the verifier to the SDK exception a caller can act on."""
    status = answer.status_code
    if status == 429:
        wait = f" after {answer.retry_after:g} s" if answer.retry_after is not None else " later"
        return LoginError(
            f"{step}: the verifier rate-limited this device (HTTP 429); try again{wait}",
            status_code=status,
            retry_after=answer.retry_after,
        )
    if status in (401, 403):
        return LoginError(
            f"{step}: the verifier rejected the device (HTTP {status}); check that it is enrolled, "
            "not revoked, and that its clock source and audience URL are right (the verifier log "
            "gives the reason)",
            status_code=status,
        )
    if 400 <= status < 500:
        return LoginError(
            f"{step}: the verifier rejected the request as invalid (HTTP {status}); the device "
            "and verifier may run incompatible protocol versions",
            status_code=status,
        )
    return TransportError(f"{step}: the verifier failed with HTTP {status}; retry later")


def _receive_json(answer: Answer, step: str) -> Mapping[str, Any]:
    if isinstance(answer, ErrorAnswer):
        raise error_for_answer(answer, step)
    if not isinstance(answer, Mapping):
        raise ProtocolError(f"{step}: expected a JSON object, got {type(answer).__name__}")
    return answer


def _resolve(channel_binding: ChannelBinding) -> bytes | None:
    return channel_binding() if callable(channel_binding) else channel_binding


def challenge_flow(
    key: PrivateKey, audience: str
) -> Generator[ChallengeRequest, Answer, tuple[Challenge, ServerClock]]:
    """Fetch a challenge for ``audience`` and anchor the server clock on its arrival."""
    device_id = device_id_of(key)
    answer = yield ChallengeRequest(device_id, audience)
    challenge = Challenge.from_json(_receive_json(answer, "challenge request"))
    clock = ServerClock.from_challenge(challenge)

    if challenge.device_id != device_id or challenge.audience != audience:
        raise ProtocolError(
            f"challenge request: the verifier returned a challenge for device "
            f"{challenge.device_id} and audience {challenge.audience}, not {device_id} and "
            f"{audience}"
        )
    return challenge, clock


def login_flow(
    key: PrivateKey,
    audience: str,
    token_url: str,
    channel_binding: ChannelBinding,
    *,
    monotonic: Callable[[], float] = time.monotonic,
) -> Generator[ChallengeRequest | TokenRequest, Answer, AccessToken]:
    """Log in over HTTP: challenge, signed assertion, access token.

    ``audience`` is the verifier's issuer URL, ``token_url`` the URL the token request goes to
    (it becomes ``htu``). Raises :class:`LoginError` when the verifier refuses and
    :class:`ProtocolError` when an answer is malformed.
    """
    challenge, clock = yield from challenge_flow(key, audience)
    assertion = build_assertion(
        key,
        challenge,
        channel_binding=_resolve(channel_binding),
        htm="POST",
        htu=token_url,
        clock=clock,
    )

    sent_at = monotonic()
    answer = yield TokenRequest(assertion, url=token_url)
    return _parse_access_token(_receive_json(answer, "token request"), sent_at)


def _parse_access_token(body: Mapping[str, Any], sent_at: float) -> AccessToken:
    token = body.get("access_token")
    token_type = body.get("token_type")
    expires_in = body.get("expires_in")
    if not isinstance(token, str) or not token:
        raise ProtocolError("token request: the response has no access_token string")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise ProtocolError(f"token request: token_type {token_type!r} is not Bearer")
    if not isinstance(expires_in, int) or isinstance(expires_in, bool) or expires_in <= 0:
        raise ProtocolError(f"token request: expires_in {expires_in!r} is not a positive integer")

    # Counting from when the request left errs on the early side, which is the safe side.
    return AccessToken(token, expires_in, sent_at + expires_in)


def mqtt_password_flow(
    key: PrivateKey, broker_url: str, channel_binding: ChannelBinding
) -> Generator[ChallengeRequest, Answer, str]:
    """Mint the CONNECT password for one MQTT connection: an assertion with ``aud`` = broker URL.

    The username is the device id (:func:`~device_sdk.auth.assertion.device_id_of`). Run it
    again for every CONNECT, reconnects included: a password is good once.
    """
    challenge, clock = yield from challenge_flow(key, broker_url)
    return build_assertion(key, challenge, channel_binding=_resolve(channel_binding), clock=clock)


def mqtt_password_without_nonce(
    key: PrivateKey,
    broker_url: str,
    channel_binding: bytes | None,
    *,
    clock: ServerClock | None = None,
    lifetime: int = MAX_NONCELESS_LIFETIME,
) -> str:
    """Mint an MQTT password without a server challenge: weaker, so use it only where required.

    The assertion has no ``nonce``. Its short ``exp`` keeps it fresh, and the verifier makes it
    single use by remembering its ``jti`` until it expires. A device whose clock is wrong
    fails, so pass a ``clock`` anchored on an earlier challenge where one exists. The verifier
    accepts such assertions only for broker audiences configured to allow them.
    """
    if not 0 < lifetime <= MAX_NONCELESS_LIFETIME:
        raise ProtocolError(f"lifetime {lifetime} s is outside 1..{MAX_NONCELESS_LIFETIME} s")
    tls = is_tls_audience(broker_url)
    if tls != (channel_binding is not None):
        raise ProtocolError(
            f"broker {broker_url}: pass the channel binding for a TLS URL, and None otherwise"
        )

    device_id = device_id_of(key)
    iat = clock.now() if clock is not None else int(time.time())
    claims: dict[str, Any] = {
        "iss": device_id,
        "sub": device_id,
        "aud": broker_url,
        "iat": iat,
        "exp": iat + lifetime,
        "jti": new_jti(),
    }
    if channel_binding is not None:
        claims["cb"] = b64url_encode(channel_binding)
    return sign_assertion(key, claims, device_id=device_id)
