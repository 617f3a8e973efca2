"""Device login for requests: an ``AuthBase`` that adds a bearer token from the verifier.

The login runs on its own ``requests.Session`` (``login_session``), because an ``AuthBase`` gets
the prepared request but not the session that sends it. A 401 on the protected request drops the
token, logs in once more and resends the request on the same adapter, as requests' own digest
authentication does; a second 401 is returned to the caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

import requests
from requests.auth import AuthBase

from device_sdk.auth import (
    AccessToken,
    ChallengeRequest,
    TokenRequest,
    device_id_of,
    is_tls_audience,
    login_flow,
    tls_server_end_point,
)
from device_sdk.auth.assertion import PrivateKey
from device_sdk.auth.flows import TOKEN_PATH
from device_sdk.auth.origins import origin_of, token_origins
from device_sdk.errors import TransportError
from device_sdk.http.httpx_auth import REFRESH_MARGIN, TokenCache, answer_from_status
from device_sdk.http.tls import requests_peer_certificate

logger = logging.getLogger(__name__)


class DeviceRequestsAuth(AuthBase):
    """Authenticate ``requests`` calls as a device whose key signs the verifier's challenges.

    ``verify`` is passed to every login request (a CA bundle path, or True for the system store).
    It is given per request because requests lets ``REQUESTS_CA_BUNDLE`` override a session's
    ``verify``. The access token goes only to requests whose origin (scheme, host, port) is in
    ``api_origins``, by default the verifier's origin alone. Other requests pass through
    untouched. Raises :class:`~device_sdk.errors.ConfigError` for an origin on plain http other
    than loopback, :class:`~device_sdk.errors.LoginError` when the verifier refuses the login
    and :class:`~device_sdk.errors.TransportError` when it cannot be reached.
    """

    def __init__(
        self,
        key: PrivateKey,
        verifier_url: str,
        *,
        audience: str | None = None,
        verify: str | bool = True,
        timeout: float = 10.0,
        login_session: requests.Session | None = None,
        refresh_margin: float = REFRESH_MARGIN,
        api_origins: Iterable[str] | None = None,
    ) -> None:
        self._key = key
        self.device_id = device_id_of(key)
        self.verifier_url = verifier_url.rstrip("/")
        self.api_origins = token_origins(self.verifier_url, api_origins)
        self.audience = audience or self.verifier_url
        self.token_url = self.verifier_url + TOKEN_PATH
        self.verify = verify
        self.timeout = timeout
        self.session = login_session or requests.Session()
        self.tokens = TokenCache(refresh_margin)
        self.logins = 0
        # One login at a time: threads that find no token wait for the one that logs in.
        self._login_lock = threading.Lock()

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if origin_of(request.url or "") not in self.api_origins:
            logger.debug(
                "device %s: %s %s is outside the API origins; sent without a token",
                self.device_id, request.method, request.url,
            )
            return request

        token = self._current_or_login()
        request.headers["Authorization"] = token.authorization
        request.register_hook("response", self._handle_401)
        return request

    def _current_or_login(self) -> AccessToken:
        token = self.tokens.get()
        if token is not None:
            return token
        with self._login_lock:
            token = self.tokens.get()
            if token is None:
                token = self.login()
            return token

    def _handle_401(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        if response.status_code != 401:
            return response
        request = response.request
        # requests runs this hook on every response of a redirect chain too, and a redirect
        # to another origin has lost the token on purpose: do not send it there again.
        if origin_of(request.url or "") not in self.api_origins:
            return response
        logger.info(
            "device %s: %s %s returned 401; logging in again once",
            self.device_id, request.method, request.url,
        )
        used = request.headers.get("Authorization")
        self.tokens.discard_authorization(used if isinstance(used, str) else None)

        # Read and release the rejected response so that its connection can carry the retry.
        _ = response.content
        response.close()

        retry = request.copy()
        token = self._current_or_login()
        retry.headers["Authorization"] = token.authorization
        retry.hooks["response"] = [
            hook for hook in retry.hooks["response"] if hook != self._handle_401
        ]
        answer = response.connection.send(retry, **kwargs)
        answer.history.append(response)
        answer.request = retry
        return answer

    def login(self) -> AccessToken:
        """Run the login flow now and cache the token."""
        started = time.monotonic()
        binding: dict[str, bytes | None] = {"cb": None}
        flow = login_flow(self._key, self.audience, self.token_url, lambda: binding["cb"])
        step: ChallengeRequest | TokenRequest = next(flow)
        while True:
            url = step.url if isinstance(step, TokenRequest) else self.verifier_url + step.path
            try:
                # stream=True keeps the connection checked out until the body is read, so its
                # certificate is still there to read.
                with self.session.post(
                    url, json=step.to_json(), verify=self.verify, timeout=self.timeout,
                    stream=True,
                ) as response:
                    if isinstance(step, ChallengeRequest) and is_tls_audience(self.audience):
                        binding["cb"] = tls_server_end_point(requests_peer_certificate(response))
                    answer = answer_from_status(
                        response.status_code, response.content, response.headers.get("retry-after")
                    )
            except requests.RequestException as exc:
                raise TransportError(f"login request to {url} failed: {exc}") from None
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
