"""Device login for httpx: an ``httpx.Auth`` that adds a bearer token from the verifier.

Before the first request, and before any request once the token is about to expire, the login
flow runs through the same ``httpx.Client`` or ``httpx.AsyncClient``. It fetches a challenge,
signs an assertion bound to the verifier certificate of the challenge's connection, and
exchanges it at the token endpoint. A 401 on the
protected request drops the token and logs in once more; a second 401 is returned to the caller.

Requests that start together without a valid token wait for one login, because a lock spans the
login's requests. It is a threading lock for ``httpx.Client`` and an asyncio lock per event loop
for ``httpx.AsyncClient``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Iterable

import httpx

from device_sdk.auth import (
    AccessToken,
    Answer,
    ChallengeRequest,
    ErrorAnswer,
    TokenRequest,
    device_id_of,
    is_tls_audience,
    login_flow,
    tls_server_end_point,
)
from device_sdk.auth.assertion import PrivateKey
from device_sdk.auth.encoding import loads_json_object
from device_sdk.auth.flows import TOKEN_PATH
from device_sdk.auth.origins import origin_of, token_origins
from device_sdk.errors import TransportError
from device_sdk.http.tls import httpx_peer_certificate

logger = logging.getLogger(__name__)

REFRESH_MARGIN = 30.0
"""Seconds before expiry at which a cached token is replaced, at most a fifth of its lifetime."""


def answer_from_status(status_code: int, content: bytes, retry_after: str | None) -> Answer:
    """Convert an HTTP response into what a login flow expects: a JSON object or an ErrorAnswer."""
    if 200 <= status_code < 300:
        return loads_json_object(content)
    seconds: float | None = None
    if retry_after is not None:
        try:
            seconds = max(0.0, float(retry_after))
        except ValueError:
            seconds = None
    return ErrorAnswer(status_code, content.decode("utf-8", "replace")[:200], seconds)


class TokenCache:
    """The current access token of one device, shared by threads; replaced before it expires."""

    def __init__(
        self,
        refresh_margin: float = REFRESH_MARGIN,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.refresh_margin = refresh_margin
        self._monotonic = monotonic
        self._token: AccessToken | None = None
        self._lock = threading.Lock()

    def get(self) -> AccessToken | None:
        """Return the token unless it expires within the refresh margin."""
        with self._lock:
            token = self._token
        if token is None:
            return None
        margin = min(self.refresh_margin, token.expires_in / 5)
        if token.expires_within(margin, self._monotonic()):
            return None
        return token

    def discard_authorization(self, authorization: str | None) -> None:
        """Drop the current token if ``authorization`` is its header value (a 401 refused it)."""
        with self._lock:
            if self._token is not None and self._token.authorization == authorization:
                self._token = None

    def put(self, token: AccessToken) -> None:
        with self._lock:
            self._token = token

    def discard(self, token: AccessToken) -> None:
        """Drop ``token`` if it is still the current one (another thread may have replaced it)."""
        with self._lock:
            if self._token is token:
                self._token = None


class _LoginLock(enum.Enum):
    """A step of :meth:`DeviceAuth._auth_steps` that the sync or async driver carries out."""

    ACQUIRE = "acquire"
    RELEASE = "release"


AuthStep = httpx.Request | _LoginLock


class DeviceAuth(httpx.Auth):
    """Authenticate httpx requests as a device whose key signs the verifier's challenges.

    ``verifier_url`` is the verifier's base URL; the login audience is its issuer URL, which
    defaults to the same URL. Works with ``httpx.Client`` and ``httpx.AsyncClient``; the login
    requests go through the client the request goes through, so its TLS settings apply.

    The access token goes only to requests whose origin (scheme, host, port) is in
    ``api_origins``, by default the verifier's origin alone. Other requests pass through
    untouched. Raises :class:`~device_sdk.errors.ConfigError` for an origin on plain http other
    than loopback, and :class:`~device_sdk.errors.LoginError` when the verifier refuses the login.
    """

    # sync_auth_flow and async_auth_flow below read the body after the server certificate,
    # because httpcore closes a "Connection: close" connection once the body is read.
    requires_request_body = True
    requires_response_body = False

    def __init__(
        self,
        key: PrivateKey,
        verifier_url: str,
        *,
        audience: str | None = None,
        refresh_margin: float = REFRESH_MARGIN,
        api_origins: Iterable[str] | None = None,
    ) -> None:
        self._key = key
        self.device_id = device_id_of(key)
        self.verifier_url = verifier_url.rstrip("/")
        self.api_origins = token_origins(self.verifier_url, api_origins)
        self.audience = audience or self.verifier_url
        self.token_url = self.verifier_url + TOKEN_PATH
        self.tokens = TokenCache(refresh_margin)
        self.logins = 0
        self._certificates: weakref.WeakKeyDictionary[httpx.Response, bytes] = (
            weakref.WeakKeyDictionary()
        )
        self._thread_login_lock = threading.Lock()
        # Logins finished so far, and the error of the last one if it failed: a request that
        # waited for the lock while a login failed raises that error instead of trying again.
        self._logins_finished = 0
        self._last_login_error: BaseException | None = None
        # An asyncio.Lock belongs to one event loop, and a client may be used from several.
        self._loop_login_locks: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Lock
        ] = weakref.WeakKeyDictionary()

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        request.read()
        steps = self._auth_steps(request)
        holding_lock = False
        try:
            step = next(steps)
            while True:
                if step is _LoginLock.ACQUIRE:
                    self._thread_login_lock.acquire()
                    holding_lock = True
                    step = steps.send(None)
                    continue
                if step is _LoginLock.RELEASE:
                    self._thread_login_lock.release()
                    holding_lock = False
                    step = steps.send(None)
                    continue

                response = yield step
                self._keep_certificate(response)
                response.read()
                try:
                    step = steps.send(response)
                except StopIteration:
                    break
        finally:
            # Close the steps while still holding the lock, so that a login cut short (httpx
            # closes this flow when a request fails) is recorded before the next one starts.
            steps.close()
            if holding_lock:
                self._thread_login_lock.release()

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        await request.aread()
        steps = self._auth_steps(request)
        lock = self._loop_login_lock()
        holding_lock = False
        try:
            step = next(steps)
            while True:
                if step is _LoginLock.ACQUIRE:
                    if lock is not None:
                        await lock.acquire()
                        holding_lock = True
                    step = steps.send(None)
                    continue
                if step is _LoginLock.RELEASE:
                    if lock is not None:
                        lock.release()
                        holding_lock = False
                    step = steps.send(None)
                    continue

                response = yield step
                self._keep_certificate(response)
                await response.aread()
                try:
                    step = steps.send(response)
                except StopIteration:
                    break
        finally:
            steps.close()
            if holding_lock and lock is not None:
                lock.release()

    def _loop_login_lock(self) -> asyncio.Lock | None:
        """Return the login lock of the running asyncio event loop, or None outside asyncio."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # NOTE: under trio (httpx runs on it through anyio) there is no asyncio loop, so
            # requests that start together without a token each log in.
            return None
        lock = self._loop_login_locks.get(loop)
        if lock is None:
            lock = asyncio.Lock()
            self._loop_login_locks[loop] = lock
        return lock

    def _keep_certificate(self, response: httpx.Response) -> None:
        """Store the certificate of a login response while its connection is still open."""
        if not is_tls_audience(self.audience):
            return
        if not str(response.request.url).startswith(self.verifier_url):
            return
        self._certificates[response] = httpx_peer_certificate(response)

    def _certificate_of(self, response: httpx.Response) -> bytes:
        return self._certificates.get(response) or httpx_peer_certificate(response)

    def _auth_steps(
        self, request: httpx.Request
    ) -> Generator[AuthStep, httpx.Response | None, None]:
        """Yield the requests to send for ``request``, and where to take and drop the login lock.

        The drivers above send back the response to each request, and None after a lock step.
        """
        if origin_of(str(request.url)) not in self.api_origins:
            logger.debug(
                "device %s: %s %s is outside the API origins; sent without a token",
                self.device_id, request.method, request.url,
            )
            yield request
            return

        token = self.tokens.get()
        if token is None:
            token = yield from self._login_once(None, request)
        request.headers["Authorization"] = token.authorization
        response = yield request
        if response is None or response.status_code != 401:
            return

        logger.info(
            "device %s: %s %s returned 401; logging in again once",
            self.device_id, request.method, request.url,
        )
        token = yield from self._login_once(token, request)
        request.headers["Authorization"] = token.authorization
        yield request

    def _login_once(
        self, rejected: AccessToken | None, request: httpx.Request
    ) -> Generator[AuthStep, httpx.Response | None, AccessToken]:
        """Log in under the login lock, unless another request did so while this one waited.

        ``rejected`` is the token a 401 just refused, or None when there was no valid token.
        If a login failed while this request waited, its error is raised here too, so that a
        verifier that is down or rate limiting gets one attempt and not one per waiting request.
        The login requests get the timeout of ``request``. The driver releases the lock if this
        raises.
        """
        finished_before = self._logins_finished
        yield _LoginLock.ACQUIRE
        if rejected is not None:
            self.tokens.discard(rejected)
        token = self.tokens.get()
        if token is None:
            failed = self._last_login_error
            if failed is not None and self._logins_finished != finished_before:
                raise failed
            try:
                token = yield from self._login(request.extensions.get("timeout"))
            except GeneratorExit:
                # httpx closes the flow when a login request fails (a connection error or a
                # timeout) without passing the error in, and also when the request is
                # cancelled. Either way the waiting requests fail now rather than wait for the
                # same verifier in turn.
                self._last_login_error = TransportError(
                    f"a concurrent login to {self.verifier_url} through this DeviceAuth ended "
                    "without a token (the verifier did not respond, or that request was "
                    "cancelled); retry the request"
                )
                self._logins_finished += 1
                raise
            except Exception as exc:
                self._last_login_error = exc
                self._logins_finished += 1
                raise
            self._last_login_error = None
            self._logins_finished += 1
        yield _LoginLock.RELEASE
        return token

    def login(self, client: httpx.Client) -> AccessToken:
        """Log in now through ``client`` and cache the token, without a protected request."""
        with self._thread_login_lock:
            flow = self._login()
            request = next(flow)
            while True:
                # auth=None: a client built with this auth would otherwise wait for the lock.
                response = client.send(request, stream=True, auth=None)
                try:
                    self._keep_certificate(response)
                    response.read()
                finally:
                    response.close()
                try:
                    request = flow.send(response)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]

    async def alogin(self, client: httpx.AsyncClient) -> AccessToken:
        """Log in now through ``client`` and cache the token, without a protected request."""
        lock = self._loop_login_lock()
        if lock is not None:
            await lock.acquire()
        try:
            flow = self._login()
            request = next(flow)
            while True:
                response = await client.send(request, stream=True, auth=None)
                try:
                    self._keep_certificate(response)
                    await response.aread()
                finally:
                    await response.aclose()
                try:
                    request = flow.send(response)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
        finally:
            if lock is not None:
                lock.release()

    def _login(
        self, timeout: dict[str, float | None] | None = None
    ) -> Generator[httpx.Request, httpx.Response, AccessToken]:
        # Requests that an auth flow yields skip Client.send, which sets the client's timeout,
        # so the caller passes the triggering request's timeout extension. None leaves it to
        # the client (login and alogin send through Client.send).
        extensions = {"timeout": timeout} if timeout is not None else None
        started = time.monotonic()
        binding: dict[str, bytes | None] = {"cb": None}
        flow = login_flow(self._key, self.audience, self.token_url, lambda: binding["cb"])
        step: ChallengeRequest | TokenRequest = next(flow)
        while True:
            url = step.url if isinstance(step, TokenRequest) else self.verifier_url + step.path
            response = yield httpx.Request(
                step.method, url, json=step.to_json(), extensions=extensions
            )
            if isinstance(step, ChallengeRequest) and is_tls_audience(self.audience):
                binding["cb"] = tls_server_end_point(self._certificate_of(response))
            answer = answer_from_status(
                response.status_code, response.content, response.headers.get("retry-after")
            )
            try:
                step = flow.send(answer)
            except StopIteration as done:
                token: AccessToken = done.value
                break

        self.tokens.put(token)
        self.logins += 1
        logger.info(
            "device %s: logged in to %s in %.1f ms; token expires in %d s",
            self.device_id, self.audience, (time.monotonic() - started) * 1000, token.expires_in,
        )
        return token
