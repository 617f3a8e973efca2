"""HTTP login with a SoftHSM key against the verifier served by uvicorn over TLS."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from fixtures_login import InterceptingProxy, VerifierServer, serve_verifier
from fixtures_services import TestPKI, UvicornFactory

from device_sdk.errors import LoginError, TransportError
from device_sdk.http import DeviceAuth, DeviceRequestsAuth
from device_sdk.http.httpx_auth import TokenCache

pytestmark = pytest.mark.slow


def whoami_url(verifier: VerifierServer) -> str:
    return verifier.url + "/v1/whoami"


def steps(history: list[httpx.Response]) -> list[tuple[str, int]]:
    return [(response.request.url.path, response.status_code) for response in history]


def test_httpx_calls_protected_endpoint(
    https_verifier: VerifierServer, device_key: Any, test_pki: TestPKI
) -> None:
    device_id = https_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, https_verifier.url)

    with httpx.Client(auth=auth, verify=test_pki.client_ssl_context()) as client:
        first = client.get(whoami_url(https_verifier))
        second = client.get(whoami_url(https_verifier))

    assert first.status_code == 200
    assert first.json()["device_id"] == device_id
    assert second.status_code == 200
    # The second request reused the cached token.
    assert auth.logins == 1


def test_httpx_async_calls_protected_endpoint(
    https_verifier: VerifierServer, device_key: Any, test_pki: TestPKI
) -> None:
    device_id = https_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, https_verifier.url)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(auth=auth, verify=test_pki.client_ssl_context()) as client:
            return await client.get(whoami_url(https_verifier))

    response = asyncio.run(call())

    assert response.status_code == 200
    assert response.json()["device_id"] == device_id
    assert auth.logins == 1


def test_requests_calls_protected_endpoint(
    https_verifier: VerifierServer, device_key: Any, test_pki: TestPKI
) -> None:
    device_id = https_verifier.enroll(device_key)
    ca = str(test_pki.ca.cert_path)
    auth = DeviceRequestsAuth(device_key, https_verifier.url, verify=ca)

    first = requests.get(whoami_url(https_verifier), auth=auth, verify=ca, timeout=10)
    second = requests.get(whoami_url(https_verifier), auth=auth, verify=ca, timeout=10)

    assert first.status_code == 200
    assert first.json()["device_id"] == device_id
    assert second.status_code == 200
    assert auth.logins == 1


def test_token_carries_device_and_issuer(
    https_verifier: VerifierServer, device_key: Any, test_pki: TestPKI
) -> None:
    device_id = https_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, https_verifier.url)

    with httpx.Client(verify=test_pki.client_ssl_context()) as client:
        token = auth.login(client)

    claims = jwt.decode(token.token, options={"verify_signature": False})
    assert claims["sub"] == device_id
    assert claims["iss"] == https_verifier.issuer
    assert token.expires_in == 300


def test_401_logs_in_once_more(
    https_verifier: VerifierServer, device_key: Any, test_pki: TestPKI
) -> None:
    https_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, https_verifier.url)
    with httpx.Client(verify=test_pki.client_ssl_context()) as client:
        token = auth.login(client)
        # A token the server does not accept, cached as if it were valid.
        forged = type(token)("not-a-valid-token", token.expires_in, token.expires_at_monotonic)
        auth.tokens.put(forged)

        response = client.get(whoami_url(https_verifier), auth=auth)

    assert response.status_code == 200
    assert steps(response.history) == [
        ("/v1/whoami", 401), ("/v1/challenges", 200), ("/v1/token", 200)
    ]
    assert auth.logins == 2


CONCURRENT_REQUESTS = 8


def test_httpx_concurrent_first_requests_log_in_once(
    https_verifier: VerifierServer, device_key: Any, test_pki: TestPKI
) -> None:
    device_id = https_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, https_verifier.url)
    barrier = threading.Barrier(CONCURRENT_REQUESTS)

    with httpx.Client(auth=auth, verify=test_pki.client_ssl_context()) as client:

        def call(_: int) -> httpx.Response:
            barrier.wait(timeout=30)
            return client.get(whoami_url(https_verifier))

        with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
            responses = list(pool.map(call, range(CONCURRENT_REQUESTS)))

    assert [response.status_code for response in responses] == [200] * CONCURRENT_REQUESTS
    assert {response.json()["device_id"] for response in responses} == {device_id}
    assert auth.logins == 1


def test_httpx_async_concurrent_first_requests_log_in_once(
    https_verifier: VerifierServer, device_key: Any, test_pki: TestPKI
) -> None:
    https_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, https_verifier.url)

    async def call() -> list[httpx.Response]:
        async with httpx.AsyncClient(auth=auth, verify=test_pki.client_ssl_context()) as client:
            calls = [client.get(whoami_url(https_verifier)) for _ in range(CONCURRENT_REQUESTS)]
            return list(await asyncio.gather(*calls))

    responses = asyncio.run(call())

    assert [response.status_code for response in responses] == [200] * CONCURRENT_REQUESTS
    assert auth.logins == 1


def test_httpx_async_auth_reused_in_new_event_loop(
    https_verifier: VerifierServer, device_key: Any, test_pki: TestPKI
) -> None:
    # An asyncio.Lock binds to the loop of its first contended use, so each loop must get its
    # own login lock: the requests below contend for it in two loops one after the other.
    https_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, https_verifier.url)

    async def call() -> list[int]:
        # An empty cache, so that each loop logs in and its requests wait for the login lock.
        auth.tokens = TokenCache()
        async with httpx.AsyncClient(auth=auth, verify=test_pki.client_ssl_context()) as client:
            calls = [client.get(whoami_url(https_verifier)) for _ in range(CONCURRENT_REQUESTS)]
            return [response.status_code for response in await asyncio.gather(*calls)]

    assert asyncio.run(call()) == [200] * CONCURRENT_REQUESTS
    assert asyncio.run(call()) == [200] * CONCURRENT_REQUESTS
    assert auth.logins == 2


def test_httpx_concurrent_401s_log_in_once(
    https_verifier: VerifierServer, device_key: Any, test_pki: TestPKI
) -> None:
    # Every request carries a token the server rejects. The first to take the login lock logs
    # in, and the others find the new token there and retry with it.
    https_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, https_verifier.url)
    barrier = threading.Barrier(CONCURRENT_REQUESTS)
    with httpx.Client(auth=auth, verify=test_pki.client_ssl_context()) as client:
        token = auth.login(client)
        forged = type(token)("not-a-valid-token", token.expires_in, token.expires_at_monotonic)
        auth.tokens.put(forged)

        def call(_: int) -> httpx.Response:
            barrier.wait(timeout=30)
            return client.get(whoami_url(https_verifier))

        with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
            responses = list(pool.map(call, range(CONCURRENT_REQUESTS)))

    assert [response.status_code for response in responses] == [200] * CONCURRENT_REQUESTS
    assert auth.logins == 2


class CountingLock:
    """A threading.Lock that counts the threads waiting to acquire it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.waiting = 0

    def acquire(self) -> bool:
        with self._count_lock:
            self.waiting += 1
        self._lock.acquire()
        with self._count_lock:
            self.waiting -= 1
        return True

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


@pytest.mark.parametrize("failure", ["429", "connection refused"])
def test_httpx_waiters_share_failed_login(failure: str) -> None:
    # A verifier that is down or rate limiting gets one login attempt, not one per waiting
    # request.
    auth = DeviceAuth(ec.generate_private_key(ec.SECP256R1()), "http://127.0.0.1:9")
    lock = CountingLock()
    auth._thread_login_lock = lock  # type: ignore[assignment]
    challenge_requests = []

    def verifier(request: httpx.Request) -> httpx.Response:
        challenge_requests.append(request.url.path)
        deadline = time.monotonic() + 30
        while lock.waiting < CONCURRENT_REQUESTS - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        if failure == "429":
            return httpx.Response(429, headers={"Retry-After": "7"}, text="slow down")
        raise httpx.ConnectError("connection refused", request=request)

    with httpx.Client(auth=auth, transport=httpx.MockTransport(verifier)) as client:

        def call(_: int) -> Exception | None:
            try:
                client.get("http://127.0.0.1:9/v1/whoami")
            except (LoginError, TransportError, httpx.TransportError) as exc:
                return exc
            return None

        with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
            errors = list(pool.map(call, range(CONCURRENT_REQUESTS)))

    assert challenge_requests == ["/v1/challenges"]
    assert not lock.locked()
    if failure == "429":
        assert [type(error) for error in errors] == [LoginError] * CONCURRENT_REQUESTS
        assert {error.retry_after for error in errors if isinstance(error, LoginError)} == {7.0}
    else:
        kinds = sorted(type(error).__name__ for error in errors)
        assert kinds == ["ConnectError"] + ["TransportError"] * (CONCURRENT_REQUESTS - 1)


def test_httpx_hung_verifier_times_out() -> None:
    # A verifier that accepts connections but never responds. The login requests must get the
    # client's timeout, and the login lock must be free again afterwards.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        auth = DeviceAuth(ec.generate_private_key(ec.SECP256R1()), url)
        with httpx.Client(auth=auth, timeout=0.5) as client:
            for _ in range(2):
                with pytest.raises(httpx.ReadTimeout):
                    client.get(url + "/v1/whoami")
                assert not auth._thread_login_lock.locked()


def test_httpx_login_through_client_with_same_auth(
    https_verifier: VerifierServer, device_key: Any, test_pki: TestPKI
) -> None:
    # login() sends its requests without the client's auth, so it neither waits for its own
    # lock nor sends a token to the challenge endpoint.
    https_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, https_verifier.url)

    with httpx.Client(auth=auth, verify=test_pki.client_ssl_context()) as client:
        auth.login(client)
        response = client.get(whoami_url(https_verifier))

    assert response.status_code == 200
    assert auth.logins == 1


def test_requests_401_logs_in_once_more(
    https_verifier: VerifierServer, device_key: Any, test_pki: TestPKI
) -> None:
    https_verifier.enroll(device_key)
    ca = str(test_pki.ca.cert_path)
    auth = DeviceRequestsAuth(device_key, https_verifier.url, verify=ca)
    token = auth.login()
    auth.tokens.put(type(token)("not-a-valid-token", token.expires_in, token.expires_at_monotonic))

    response = requests.get(whoami_url(https_verifier), auth=auth, verify=ca, timeout=10)

    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert auth.logins == 2


def test_second_401_is_returned(
    uvicorn_factory: UvicornFactory, test_pki: TestPKI, tmp_path: Path, device_key: Any
) -> None:
    # A protected endpoint on another verifier: its tokens are signed by another key, so every
    # token from the first verifier gets 401 there, even right after a fresh login.
    login_verifier = serve_verifier(
        uvicorn_factory, tmp_path / "a", tls=test_pki.server, ca_path=test_pki.ca.cert_path
    )
    other = serve_verifier(
        uvicorn_factory, tmp_path / "b", tls=test_pki.server, ca_path=test_pki.ca.cert_path
    )
    login_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, login_verifier.url, api_origins=[login_verifier.url, other.url])

    with httpx.Client(auth=auth, verify=test_pki.client_ssl_context()) as client:
        response = client.get(whoami_url(other))

    assert response.status_code == 401
    assert steps(response.history) == [
        ("/v1/challenges", 200), ("/v1/token", 200), ("/v1/whoami", 401),
        ("/v1/challenges", 200), ("/v1/token", 200),
    ]
    assert auth.logins == 2


def test_token_refreshed_before_expiry(
    uvicorn_factory: UvicornFactory, test_pki: TestPKI, tmp_path: Path, device_key: Any
) -> None:
    verifier = serve_verifier(
        uvicorn_factory, tmp_path, tls=test_pki.server, ca_path=test_pki.ca.cert_path,
        access_token_lifetime=5,
    )
    verifier.enroll(device_key)
    auth = DeviceAuth(device_key, verifier.url)

    with httpx.Client(auth=auth, verify=test_pki.client_ssl_context()) as client:
        assert client.get(whoami_url(verifier)).status_code == 200
        # The margin is a fifth of the 5 s lifetime: after 4.2 s the token counts as expiring.
        time.sleep(4.2)
        response = client.get(whoami_url(verifier))

    assert response.status_code == 200
    assert steps(response.history) == [("/v1/challenges", 200), ("/v1/token", 200)]
    assert auth.logins == 2


def test_unknown_device_login_raises(
    https_verifier: VerifierServer, software_key: Any, test_pki: TestPKI
) -> None:
    auth = DeviceAuth(software_key, https_verifier.url)

    with (
        httpx.Client(auth=auth, verify=test_pki.client_ssl_context()) as client,
        pytest.raises(LoginError) as caught,
    ):
        client.get(whoami_url(https_verifier))

    assert caught.value.status_code == 401
    assert str(caught.value).startswith("challenge request: the verifier rejected the device")


@pytest.mark.parametrize("adapter", ["httpx", "requests"])
def test_intercepting_proxy_rejected_for_channel_binding(
    uvicorn_factory: UvicornFactory,
    test_pki: TestPKI,
    tmp_path: Path,
    device_key: Any,
    caplog: pytest.LogCaptureFixture,
    adapter: str,
) -> None:
    # The device reaches the verifier's public URL through a proxy that shows another
    # certificate from a CA the device trusts. The verifier knows only its own certificate.
    proxy = InterceptingProxy(
        test_pki.other_server,
        upstream_port=0,
        upstream_context=test_pki.client_ssl_context(),
    )
    proxy.start()
    try:
        verifier = serve_verifier(
            uvicorn_factory, tmp_path, tls=test_pki.server, ca_path=test_pki.ca.cert_path,
            issuer=proxy.url,
        )
        proxy.upstream_port = verifier.server.port
        verifier.enroll(device_key)
        caplog.set_level(logging.DEBUG)

        with pytest.raises(LoginError) as caught:
            if adapter == "httpx":
                auth = DeviceAuth(device_key, proxy.url)
                with httpx.Client(auth=auth, verify=test_pki.client_ssl_context()) as client:
                    client.get(proxy.url + "/v1/whoami")
            else:
                ca = str(test_pki.ca.cert_path)
                requests_auth = DeviceRequestsAuth(device_key, proxy.url, verify=ca)
                requests.get(proxy.url + "/v1/whoami", auth=requests_auth, verify=ca, timeout=10)
    finally:
        proxy.stop()

    assert caught.value.status_code == 401
    assert str(caught.value).startswith("token request: the verifier rejected the device")
    log = verifier.log_text()
    assert "reason=channel_binding_mismatch" in log
    # Neither the assertion nor a token reaches the device's log.
    assert "eyJ" not in caplog.text


def test_proxy_with_server_certificate_is_accepted(
    uvicorn_factory: UvicornFactory, test_pki: TestPKI, tmp_path: Path, device_key: Any
) -> None:
    # The control case: a TLS-terminating front end that presents the verifier's own
    # certificate (a load balancer holding it) passes the channel binding check.
    proxy = InterceptingProxy(
        test_pki.server, upstream_port=0, upstream_context=test_pki.client_ssl_context()
    )
    proxy.start()
    try:
        verifier = serve_verifier(
            uvicorn_factory, tmp_path, tls=test_pki.server, ca_path=test_pki.ca.cert_path,
            issuer=proxy.url,
        )
        proxy.upstream_port = verifier.server.port
        verifier.enroll(device_key)
        auth = DeviceAuth(device_key, proxy.url)
        with httpx.Client(auth=auth, verify=test_pki.client_ssl_context()) as client:
            response = client.get(proxy.url + "/v1/whoami")
    finally:
        proxy.stop()

    assert response.status_code == 200


def test_certificate_of_login_connection_is_bound(
    https_verifier: VerifierServer, device_key: Any, test_pki: TestPKI
) -> None:
    https_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, https_verifier.url)
    context = test_pki.client_ssl_context()
    seen: list[bytes] = []

    def keep(response: httpx.Response) -> None:
        stream = response.extensions["network_stream"]
        seen.append(stream.get_extra_info("ssl_object").getpeercert(True))

    with httpx.Client(verify=context, event_hooks={"response": [keep]}) as client:
        auth.login(client)

    der = ssl.PEM_cert_to_DER_cert(test_pki.server.cert_pem.decode())
    assert seen == [der, der]


def test_alogin_then_request_reuses_token(
    https_verifier: VerifierServer, device_key: Any, test_pki: TestPKI
) -> None:
    device_id = https_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, https_verifier.url)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(verify=test_pki.client_ssl_context()) as client:
            await auth.alogin(client)
            return await client.get(whoami_url(https_verifier), auth=auth)

    response = asyncio.run(call())

    assert response.status_code == 200
    assert response.json()["device_id"] == device_id
    assert response.history == []
    assert auth.logins == 1
