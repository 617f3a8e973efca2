"""The access token goes only to allowed origins: two real servers, httpx and requests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
import requests
from fixtures_login import VerifierServer
from fixtures_services import HTTPServer, TestPKI, UvicornFactory

from device_sdk.auth.flows import AccessToken
from device_sdk.auth.origins import Origin, is_loopback_host, origin_of, token_origins
from device_sdk.errors import ConfigError
from device_sdk.http import DeviceAuth, DeviceRequestsAuth

ECHO_APP = "fixtures_login:create_header_echo_app"


@pytest.fixture
def echo_server(uvicorn_factory: UvicornFactory, test_pki: TestPKI) -> HTTPServer:
    """A second HTTPS server, on another port, that returns the Authorization header it got."""
    return uvicorn_factory.app(ECHO_APP, tls=test_pki.server, ca_path=test_pki.ca.cert_path)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://Verifier.Example.com/v1", Origin("https", "verifier.example.com", 443)),
        ("https://verifier.example.com:8443", Origin("https", "verifier.example.com", 8443)),
        ("http://127.0.0.1:8000/x?y=1", Origin("http", "127.0.0.1", 8000)),
        ("http://localhost", Origin("http", "localhost", 80)),
        ("https://[::1]:9000/", Origin("https", "::1", 9000)),
        ("ftp://verifier.example.com", None),
        ("https://", None),
        ("https://verifier.example.com:99999", None),
        ("verifier.example.com", None),
    ],
)
def test_origin_of_url(url: str, expected: Origin | None) -> None:
    assert origin_of(url) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", True),
        ("LOCALHOST.", True),
        ("127.0.0.1", True),
        ("127.200.3.4", True),
        ("::1", True),
        ("[::1]", True),
        ("128.0.0.1", False),
        ("10.0.0.1", False),
        ("localhost.example.com", False),
        ("verifier.example.com", False),
    ],
)
def test_loopback_hosts(host: str, expected: bool) -> None:
    assert is_loopback_host(host) is expected


def test_token_origins_default_to_verifier() -> None:
    assert token_origins("https://verifier.example.com/", None) == {
        Origin("https", "verifier.example.com", 443)
    }


def test_token_origins_reject_plain_http() -> None:
    with pytest.raises(ConfigError) as caught:
        token_origins("https://verifier.example.com", ["http://api.example.com:8080"])

    message = str(caught.value)
    assert "API origin 'http://api.example.com:8080' uses plain http" in message
    assert "use https://api.example.com:8080" in message


@pytest.mark.parametrize("adapter", ["httpx", "requests"])
def test_adapters_reject_plain_http_verifier(software_key: Any, adapter: str) -> None:
    with pytest.raises(ConfigError) as caught:
        if adapter == "httpx":
            DeviceAuth(software_key, "http://verifier.example.com")
        else:
            DeviceRequestsAuth(software_key, "http://verifier.example.com")

    assert "verifier URL 'http://verifier.example.com' uses plain http" in str(caught.value)


def test_adapters_accept_loopback_http(software_key: Any) -> None:
    auth = DeviceAuth(software_key, "http://127.0.0.1:8000", api_origins=["http://localhost:9"])

    assert auth.api_origins == {Origin("http", "localhost", 9)}


@pytest.mark.slow
def test_httpx_token_stays_off_other_origin(
    https_verifier: VerifierServer, echo_server: HTTPServer, device_key: Any, test_pki: TestPKI
) -> None:
    https_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, https_verifier.url)

    with httpx.Client(auth=auth, verify=test_pki.client_ssl_context()) as client:
        echoed = client.get(echo_server.url + "/anything")
        logins_after_echo = auth.logins
        whoami = client.get(https_verifier.url + "/v1/whoami")

    assert echoed.status_code == 200
    assert echoed.json() == {"authorization": None}
    assert echoed.history == []
    assert logins_after_echo == 0
    assert whoami.status_code == 200
    assert auth.logins == 1


@pytest.mark.slow
def test_httpx_async_token_stays_off_other_origin(
    https_verifier: VerifierServer, echo_server: HTTPServer, device_key: Any, test_pki: TestPKI
) -> None:
    https_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, https_verifier.url)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(auth=auth, verify=test_pki.client_ssl_context()) as client:
            return await client.get(echo_server.url + "/anything")

    echoed = asyncio.run(call())

    assert echoed.json() == {"authorization": None}
    assert auth.logins == 0


@pytest.mark.slow
def test_httpx_token_sent_to_listed_origin(
    https_verifier: VerifierServer, echo_server: HTTPServer, device_key: Any, test_pki: TestPKI
) -> None:
    https_verifier.enroll(device_key)
    auth = DeviceAuth(
        device_key, https_verifier.url, api_origins=[https_verifier.url, echo_server.url]
    )

    with httpx.Client(auth=auth, verify=test_pki.client_ssl_context()) as client:
        echoed = client.get(echo_server.url + "/anything")

    token = auth.tokens.get()
    assert token is not None
    assert echoed.json() == {"authorization": token.authorization}
    assert token.authorization.startswith("Bearer ")
    assert auth.logins == 1


@pytest.mark.slow
def test_requests_token_stays_off_other_origin(
    https_verifier: VerifierServer, echo_server: HTTPServer, device_key: Any, test_pki: TestPKI
) -> None:
    https_verifier.enroll(device_key)
    ca = str(test_pki.ca.cert_path)
    auth = DeviceRequestsAuth(device_key, https_verifier.url, verify=ca)

    echoed = requests.get(echo_server.url + "/anything", auth=auth, verify=ca, timeout=10)
    logins_after_echo = auth.logins
    whoami = requests.get(https_verifier.url + "/v1/whoami", auth=auth, verify=ca, timeout=10)

    assert echoed.status_code == 200
    assert echoed.json() == {"authorization": None}
    assert logins_after_echo == 0
    assert whoami.status_code == 200
    assert auth.logins == 1


@pytest.mark.slow
def test_requests_token_sent_to_listed_origin(
    https_verifier: VerifierServer, echo_server: HTTPServer, device_key: Any, test_pki: TestPKI
) -> None:
    https_verifier.enroll(device_key)
    ca = str(test_pki.ca.cert_path)
    auth = DeviceRequestsAuth(
        device_key, https_verifier.url, verify=ca,
        api_origins=[https_verifier.url, echo_server.url],
    )

    echoed = requests.get(echo_server.url + "/anything", auth=auth, verify=ca, timeout=10)

    token = auth.tokens.get()
    assert token is not None
    assert echoed.json() == {"authorization": token.authorization}
    assert auth.logins == 1


@pytest.mark.slow
def test_plain_http_loopback_origin_gets_token(
    https_verifier: VerifierServer,
    uvicorn_factory: UvicornFactory,
    device_key: Any,
    test_pki: TestPKI,
) -> None:
    plain = uvicorn_factory.app(ECHO_APP)
    https_verifier.enroll(device_key)
    auth = DeviceAuth(device_key, https_verifier.url, api_origins=[https_verifier.url, plain.url])

    with httpx.Client(auth=auth, verify=test_pki.client_ssl_context()) as client:
        echoed = client.get(plain.url + "/anything")

    token = auth.tokens.get()
    assert token is not None
    assert echoed.json() == {"authorization": token.authorization}


def test_requests_401_after_redirect_to_other_origin_gets_no_token(software_key: Any) -> None:
    # requests runs the response hook on every response of a redirect chain, and strips the
    # Authorization header when the host changes. A 401 from the redirect target must not be
    # retried there with the device's token.
    class RecordingAdapter:
        sent: list[requests.PreparedRequest] = []

        def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
            self.sent.append(request)
            return requests.Response()

    auth = DeviceRequestsAuth(software_key, "https://verifier.example.com")
    auth.tokens.put(AccessToken("secret-token", 300, time.monotonic() + 300))
    redirected = requests.Request("GET", "https://elsewhere.example.net/x").prepare()
    response = requests.Response()
    response.status_code = 401
    response.request = redirected
    response.connection = RecordingAdapter()
    response._content = b""

    answer = auth._handle_401(response)

    assert answer is response
    assert RecordingAdapter.sent == []
