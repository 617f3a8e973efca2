"""An MQTT connection that logs in with a fresh device assertion on every CONNECT.

The paho-mqtt client is used by composition: this module sets public callbacks and options on a
``paho.mqtt.client.Client`` and drives its network loop from its own thread. So paho's own
reconnect logic, with a fixed doubling, no jitter and a password set once, never runs.

Why the password is minted in ``on_socket_open``: paho calls that callback after the TCP
connection and the TLS handshake, and before it builds the CONNECT packet from the username and
password. At that point the broker certificate of the very connection that will carry the
password is known, so ``cb`` binds the assertion to it. A separate TLS probe before CONNECT would
bind a certificate of another connection, which a proxy could present selectively, and pinning an
expected certificate would break on every certificate rotation. The challenge is fetched from the
verifier before the broker connection opens, so a verifier outage costs no broker connection.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from device_sdk.auth import (
    MAX_ASSERTION_LIFETIME,
    Answer,
    Challenge,
    ChallengeRequest,
    ErrorAnswer,
    ServerClock,
    build_assertion,
    challenge_flow,
    device_id_of,
    error_for_answer,
    mqtt_password_without_nonce,
    tls_server_end_point,
)
from device_sdk.auth.assertion import PrivateKey
from device_sdk.auth.encoding import loads_json_object
from device_sdk.auth.flows import MAX_NONCELESS_LIFETIME
from device_sdk.auth.origins import is_loopback_host
from device_sdk.errors import (
    ConfigError,
    DeviceSDKError,
    LoginError,
    PasswordTooLongError,
    ProtocolError,
    TransportError,
)
from device_sdk.mqtt.backoff import Backoff
from device_sdk.mqtt.password import check_password_length

logger = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

# CONNACK reason codes that mean the credentials were refused. MQTT 3.1.1 return codes 4 and 5
# reach paho 2 callbacks as these MQTT 5 codes.
BAD_USERNAME_OR_PASSWORD = 134
NOT_AUTHORIZED = 135
AUTH_REFUSED_CODES = frozenset({BAD_USERNAME_OR_PASSWORD, NOT_AUTHORIZED})

LOOP_TIMEOUT = 0.2
"""Seconds one paho network loop call waits for traffic; also how fast :meth:`stop` is seen."""


class Outcome:
    """Outcomes of one connection attempt, as recorded in :class:`ConnectAttempt`."""

    CONNECTED = "connected"
    NOT_AUTHORISED = "not_authorised"
    REFUSED = "refused"
    NETWORK = "network"
    VERIFIER_UNAVAILABLE = "verifier_unavailable"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ConnectAttempt:
    """One try to log in to the broker.

    ``started`` is on the monotonic clock. ``jti``, ``nonce`` and ``cb`` (the channel binding,
    base64url) identify the assertion sent as password: they are not secret, the signed assertion
    is. ``delay`` is the wait in seconds
    chosen after the attempt failed or its connection ended, and None while it is connected.
    """

    number: int
    started: float
    outcome: str
    detail: str = ""
    jti: str | None = None
    nonce: str | None = None
    delay: float | None = None
    cb: str | None = None


@dataclass(frozen=True)
class BrokerAddress:
    """Host, port and transport security of a broker URL (``mqtt://`` or ``mqtts://``)."""

    url: str
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ConfigError(
                f"invalid broker URL {url!r}: the scheme must be mqtt or mqtts, "
                "for example mqtts://broker.example.com:8883"
            )
        if not parts.hostname:
            raise ConfigError(f"invalid broker URL {url!r}: the host is missing")
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise ConfigError(
                f"invalid broker URL {url!r}: only scheme, host and port are allowed"
            )
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise ConfigError(f"invalid broker URL {url!r}: the port is not a number") from None
        # Over plain TCP the password crosses the network readable and without a channel
        # binding, so a listener could race the device to the broker with it.
        if scheme == "mqtt" and not is_loopback_host(parts.hostname):
            raise ConfigError(
                f"broker URL {url!r} uses plain mqtt to a host that is not loopback; use "
                f"mqtts://{parts.hostname}:8883 (or the broker's TLS port)"
            )
        return cls(url, parts.hostname, port, scheme == "mqtts")


class _AttemptFailed(Exception):
    """Ends one attempt early with its outcome; never leaves this module."""

    def __init__(self, outcome: str, detail: str, retry_after: float | None = None) -> None:
        self.outcome = outcome
        self.detail = detail
        self.retry_after = retry_after
        super().__init__(detail)


@dataclass
class _Minting:
    """State of the assertion for the attempt in progress."""

    challenge: Challenge | None = None
    clock: ServerClock | None = None
    jti: str | None = None
    nonce: str | None = None
    cb: str | None = None
    error: BaseException | None = None


class DeviceMqttClient:
    """A paho-mqtt client whose every CONNECT carries a freshly signed device assertion.

    Username is the device id, password a compact JWS with ``aud`` = ``broker_url`` and, over
    TLS, ``cb`` = the ``tls-server-end-point`` of the broker certificate seen on that connection.
    The nonce comes from the verifier's challenge endpoint at ``verifier_url``. With
    ``nonceless=True`` the password is an assertion without a server nonce, fresh only by its
    short ``exp`` and its ``jti``: weaker, and accepted only where the verifier allows it.

    Use :attr:`paho` for ``publish``, ``subscribe`` and ``on_message``; leave its ``on_connect``,
    ``on_disconnect`` and ``on_socket_open`` to this class and set :attr:`on_connect` instead.
    :meth:`start` runs the connection in a background thread with reconnects; :meth:`connect_once`
    makes one blocking attempt and raises on failure.

    Reconnects wait with exponential backoff and full jitter. A rejected login ("not authorised",
    CONNACK 5 or reason code 135, and "bad user name or password", 4 or 134) is retried at once
    with a new assertion, because the first may have crossed a verifier restart. A second
    rejection in a row waits like a network failure. A successful connection resets the backoff.

    Options: ``verify`` is the httpx TLS setting for the verifier when no ``http_client`` is
    given, and ``tls_context`` the context for an ``mqtts://`` broker. ``assertion_lifetime`` is
    the seconds from ``iat`` to ``exp`` (at most 60). ``broker_password_limit`` is a broker's own
    password limit in bytes, below the MQTT limit of 65535. ``connect_timeout`` bounds the TCP and
    TLS set-up, the challenge request and the wait for CONNACK, each in seconds.
    """

    def __init__(
        self,
        key: PrivateKey,
        broker_url: str,
        *,
        verifier_url: str | None = None,
        http_client: httpx.Client | None = None,
        verify: ssl.SSLContext | str | bool = True,
        tls_context: ssl.SSLContext | None = None,
        client_id: str | None = None,
        clean_session: bool = False,
        keepalive: int = 60,
        connect_timeout: float = 10.0,
        backoff: Backoff | None = None,
        broker_password_limit: int | None = None,
        nonceless: bool = False,
        clock: ServerClock | None = None,
        assertion_lifetime: int = MAX_ASSERTION_LIFETIME,
        on_attempt: Callable[[ConnectAttempt], None] | None = None,
    ) -> None:
        self.address = BrokerAddress.parse(broker_url)
        if verifier_url is None and not nonceless:
            raise ConfigError(
                "verifier_url is missing: the device fetches its MQTT login nonce from the "
                "verifier; pass verifier_url, or nonceless=True for the weaker time-based mode"
            )
        self._key = key
        self.device_id = device_id_of(key)
        self.verifier_url = verifier_url.rstrip("/") if verifier_url else None
        self._own_http_client = http_client is None
        self._http = http_client or httpx.Client(verify=verify, timeout=connect_timeout)
        self.connect_timeout = connect_timeout
        self.backoff = backoff or Backoff()
        self.broker_password_limit = broker_password_limit
        self.nonceless = nonceless
        self._clock = clock
        if not 0 < assertion_lifetime <= MAX_ASSERTION_LIFETIME:
            raise ConfigError(
                f"invalid assertion lifetime {assertion_lifetime} s: it must be 1 to "
                f"{MAX_ASSERTION_LIFETIME} s"
            )
        self.assertion_lifetime = assertion_lifetime
        self.on_attempt = on_attempt
        self.on_connect: Callable[[DeviceMqttClient, bool], None] | None = None

        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or self.device_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        self.paho.connect_timeout = connect_timeout
        self._keepalive = keepalive
        if self.address.tls:
            self.paho.tls_set_context(tls_context or ssl.create_default_context())
        elif tls_context is not None:
            raise ConfigError(
                f"a TLS context was given for {broker_url}, which is not a TLS URL; use mqtts://"
            )
        self.paho.on_socket_open = self._on_socket_open
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect

        self.attempts: deque[ConnectAttempt] = deque(maxlen=200)
        self.error: DeviceSDKError | None = None
        self._minting = _Minting()
        self._connack: ReasonCode | None = None
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._attempt_number = 0
        self._attempt_started = 0.0
        self._auth_refusals_in_row = 0

    # ------------------------------------------------------------------------------------------
    # Public control

    def start(self) -> None:
        """Connect in a background thread and keep reconnecting until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("DeviceMqttClient.start() was already called")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-{self.device_id[:8]}", daemon=True
        )
        self._thread.start()
        logger.info("device %s: MQTT client started for %s", self.device_id, self.address.url)

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect cleanly and end the background thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._own_http_client:
            self._http.close()
        logger.info("device %s: MQTT client stopped", self.device_id)

    def wait_connected(self, timeout: float) -> bool:
        """Wait until the client is connected; return False on timeout or a fatal error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._connected.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
                return True
            if self.error is not None:
                return False
        return self._connected.is_set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect_once(self) -> ConnectAttempt:
        """Make one connection attempt in this thread and wait for the CONNACK.

        Returns the attempt once connected; the network loop is then the caller's
        (``paho.loop_start()``, or :meth:`disconnect`). Raises :class:`LoginError` when the
        broker refuses the login, :class:`TransportError` when the broker or the verifier cannot
        be reached, and :class:`PasswordTooLongError` for an oversized password.
        """
        attempt = self._attempt(serve=False)
        if attempt.outcome == Outcome.CONNECTED:
            return attempt
        if self.error is not None:
            raise self.error
        if attempt.outcome == Outcome.NOT_AUTHORISED:
            raise LoginError(f"broker {self.address.url} rejected the login: {attempt.detail}")
        raise TransportError(f"MQTT login to {self.address.url} failed: {attempt.detail}")

    def disconnect(self) -> None:
        """Send DISCONNECT and close the connection made by :meth:`connect_once`."""
        self.paho.disconnect()
        deadline = time.monotonic() + self.connect_timeout
        while time.monotonic() < deadline:
            if self.paho.loop(LOOP_TIMEOUT) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        self._connected.clear()
        if self._own_http_client:
            self._http.close()

    # ------------------------------------------------------------------------------------------
    # Reconnect loop

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                attempt = self._attempt(serve=True)
            except Exception:  # noqa: BLE001
                # paho re-raises what a user callback (on_message, ...) raises from inside its
                # network loop. Log it and reconnect instead of letting the thread die silently.
                logger.exception(
                    "device %s: error in the MQTT network loop; reconnecting", self.device_id
                )
                self._connected.clear()
                self._stop.wait(self.backoff.next_delay())
                continue
            if attempt.outcome == Outcome.STOPPED or self.error is not None:
                break
            self._stop.wait(attempt.delay or 0.0)
        self._connected.clear()

    def _next_delay(self, outcome: str, retry_after: float | None) -> float:
        if outcome == Outcome.NOT_AUTHORISED:
            self._auth_refusals_in_row += 1
            if self._auth_refusals_in_row == 1:
                return 0.0
        else:
            self._auth_refusals_in_row = 0
        delay = self.backoff.next_delay()
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def _attempt(self, *, serve: bool) -> ConnectAttempt:
        """Fetch a challenge, connect, and with ``serve`` run the loop until the connection ends."""
        self._attempt_number += 1
        self._attempt_started = time.monotonic()
        self._minting = _Minting()
        self._connack = None
        retry_after: float | None = None
        accepted = False

        try:
            self._prepare_password()
            self._send_connect()
            accepted = self._serve(until_connack_only=not serve)
            outcome, detail = self._classify(accepted)
        except _AttemptFailed as failure:
            outcome, detail, retry_after = failure.outcome, failure.detail, failure.retry_after
        except PasswordTooLongError as exc:
            # No retry can shorten the assertion, so the loop stops and keeps the error.
            self.error = exc
            outcome, detail = Outcome.REFUSED, str(exc)
            logger.error("device %s: %s", self.device_id, exc)
        finally:
            # The used assertion never stays on the paho client, so nothing can send it again.
            self.paho.username_pw_set(self.device_id, None)

        if accepted and not serve:
            # _on_connect has reported this attempt; the connection stays open for the caller.
            return self.attempts[-1]

        if self._stop.is_set():
            outcome = Outcome.STOPPED
        if accepted:
            self.backoff.reset()
        delay = None if outcome == Outcome.STOPPED else self._next_delay(outcome, retry_after)
        attempt = self._record(outcome, detail, delay)
        return attempt

    def _record(self, outcome: str, detail: str, delay: float | None) -> ConnectAttempt:
        attempt = ConnectAttempt(
            self._attempt_number,
            self._attempt_started,
            outcome,
            detail,
            self._minting.jti,
            self._minting.nonce,
            delay,
            self._minting.cb,
        )
        self._report(attempt)
        return attempt

    def _report(self, attempt: ConnectAttempt) -> None:
        self.attempts.append(attempt)
        if attempt.outcome in (Outcome.CONNECTED, Outcome.STOPPED):
            logger.info(
                "device %s: MQTT attempt %d to %s: %s %s",
                self.device_id, attempt.number, self.address.url, attempt.outcome, attempt.detail,
            )
        else:
            logger.warning(
                "device %s: MQTT attempt %d to %s failed (%s: %s); next try in %.2f s",
                self.device_id, attempt.number, self.address.url, attempt.outcome,
                attempt.detail, attempt.delay or 0.0,
            )
        if self.on_attempt is not None:
            self.on_attempt(attempt)

    # ------------------------------------------------------------------------------------------
    # One attempt, step by step

    def _prepare_password(self) -> None:
        """Fetch the challenge now; the assertion is signed once the broker certificate is known."""
        if self.nonceless:
            return
        flow = challenge_flow(self._key, self.address.url)
        request = next(flow)
        answer = self._post_challenge(request)
        try:
            flow.send(answer)
        except StopIteration as done:
            # The server clock is anchored now, when the challenge arrived.
            self._minting.challenge, self._minting.clock = done.value
        except ProtocolError as exc:
            raise _AttemptFailed(Outcome.VERIFIER_UNAVAILABLE, str(exc)) from None

    def _post_challenge(self, request: ChallengeRequest) -> Answer:
        assert self.verifier_url is not None
        url = self.verifier_url + request.path
        try:
            response = self._http.post(url, json=request.to_json())
        except httpx.HTTPError as exc:
            raise _AttemptFailed(
                Outcome.VERIFIER_UNAVAILABLE, f"challenge request to {url} failed: {exc!r}"
            ) from None

        if response.is_success:
            try:
                return loads_json_object(response.content)
            except ProtocolError as exc:
                raise _AttemptFailed(Outcome.VERIFIER_UNAVAILABLE, str(exc)) from None
        answer = ErrorAnswer(
            response.status_code, response.text, _retry_after(response.headers.get("retry-after"))
        )
        error = error_for_answer(answer, "challenge request")
        if response.status_code in (401, 403):
            raise _AttemptFailed(Outcome.NOT_AUTHORISED, str(error))
        raise _AttemptFailed(Outcome.VERIFIER_UNAVAILABLE, str(error), answer.retry_after)

    def _send_connect(self) -> None:
        """Open the connection; :meth:`_on_socket_open` signs the password before CONNECT."""
        self._connected.clear()
        self.paho.username_pw_set(self.device_id, None)
        try:
            self.paho.connect(self.address.host, self.address.port, self._keepalive)
        except _MintingFailed:
            error = self._minting.error
            if isinstance(error, PasswordTooLongError):
                raise error from None
            detail = f"signing the assertion failed: {error}"
            raise _AttemptFailed(Outcome.REFUSED, detail) from None
        except (OSError, ssl.SSLError) as exc:
            raise _AttemptFailed(
                Outcome.NETWORK, f"connection to {self.address.host}:{self.address.port} "
                f"failed: {exc!r}"
            ) from None

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        try:
            password = self._mint(sock)
            check_password_length(password.encode("ascii"), self.broker_password_limit)
        except (DeviceSDKError, ValueError) as exc:
            self._minting.error = exc
            sock.close()
            raise _MintingFailed() from None
        client.username_pw_set(self.device_id, password)

    def _mint(self, sock: Any) -> str:
        channel_binding = None
        if self.address.tls:
            certificate = sock.getpeercert(True)
            if not certificate:
                raise ProtocolError(
                    f"broker {self.address.url} sent no certificate, so the login cannot be "
                    "bound to the TLS connection"
                )
            channel_binding = tls_server_end_point(certificate)

        minting = self._minting
        if self.nonceless:
            password = mqtt_password_without_nonce(
                self._key, self.address.url, channel_binding, clock=self._clock,
                lifetime=min(self.assertion_lifetime, MAX_NONCELESS_LIFETIME),
            )
        else:
            assert minting.challenge is not None
            password = build_assertion(
                self._key,
                minting.challenge,
                channel_binding=channel_binding,
                clock=minting.clock,
                lifetime=self.assertion_lifetime,
            )

        claims = jwt.decode(password, options={"verify_signature": False})
        minting.jti = claims.get("jti")
        minting.nonce = claims.get("nonce")
        minting.cb = claims.get("cb")
        return password

    def _serve(self, *, until_connack_only: bool) -> bool:
        """Run the network loop; return True if the broker accepted the login."""
        connack_deadline = time.monotonic() + self.connect_timeout
        while True:
            if self._stop.is_set():
                self.paho.disconnect()
                self._drain()
                return self._connected.is_set()
            if self._connack is None and time.monotonic() > connack_deadline:
                self.paho.disconnect()
                self._drain()
                raise _AttemptFailed(
                    Outcome.NETWORK, f"no CONNACK within {self.connect_timeout:g} s"
                )
            if until_connack_only and self._connected.is_set():
                return True
            if self.paho.loop(LOOP_TIMEOUT) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return self._connack is not None and self._connack.value == 0

    def _drain(self) -> None:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if self.paho.loop(LOOP_TIMEOUT) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    def _classify(self, accepted: bool) -> tuple[str, str]:
        """Return the outcome of an ended connection: refused, lost, or closed before CONNACK."""
        connack = self._connack
        if connack is None:
            return Outcome.NETWORK, "connection closed before CONNACK"
        if connack.value in AUTH_REFUSED_CODES:
            return Outcome.NOT_AUTHORISED, f"CONNACK {connack.value} ({connack})"
        if connack.value != 0:
            return Outcome.REFUSED, f"CONNACK {connack.value} ({connack})"
        return Outcome.NETWORK, "connection lost"

    # ------------------------------------------------------------------------------------------
    # paho callbacks

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        self._connack = reason
        if reason.value != 0:
            return
        self._auth_refusals_in_row = 0
        self._connected.set()
        self._record(Outcome.CONNECTED, f"session present: {bool(flags.session_present)}", None)
        if self.on_connect is not None:
            self.on_connect(self, bool(flags.session_present))

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        self._connected.clear()


class _MintingFailed(Exception):
    """Raised from ``on_socket_open`` to abort paho's connect; the cause is in ``_Minting``."""


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
