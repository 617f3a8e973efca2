"""The server certificate read from the connection that carried a response, over real TLS."""

from __future__ import annotations

import asyncio
import ssl

import httpx
import pytest
import requests
from fixtures_services import TestPKI, UvicornFactory

from device_sdk.errors import ProtocolError
from device_sdk.http import httpx_peer_certificate, requests_peer_certificate

SAMPLE_APP = "fixtures_services:create_sample_app"


def der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def test_httpx_sync_reads_served_certificate(
    uvicorn_factory: UvicornFactory, test_pki: TestPKI
) -> None:
    server = uvicorn_factory.app(SAMPLE_APP, tls=test_pki.server, ca_path=test_pki.ca.cert_path)

    with httpx.Client(verify=test_pki.client_ssl_context()) as client:
        response = client.get(server.url + "/healthz")
        certificate = httpx_peer_certificate(response)

    assert certificate == der(test_pki.server.cert_pem)


def test_httpx_async_reads_served_certificate(
    uvicorn_factory: UvicornFactory, test_pki: TestPKI
) -> None:
    server = uvicorn_factory.app(
        SAMPLE_APP, tls=test_pki.other_server, ca_path=test_pki.ca.cert_path
    )

    async def fetch() -> bytes:
        async with httpx.AsyncClient(verify=test_pki.client_ssl_context()) as client:
            response = await client.get(server.url + "/healthz")
            return httpx_peer_certificate(response)

    assert asyncio.run(fetch()) == der(test_pki.other_server.cert_pem)


def test_requests_stream_reads_served_certificate(
    uvicorn_factory: UvicornFactory, test_pki: TestPKI
) -> None:
    server = uvicorn_factory.app(SAMPLE_APP, tls=test_pki.server, ca_path=test_pki.ca.cert_path)

    with requests.get(
        server.url + "/healthz", verify=str(test_pki.ca.cert_path), stream=True, timeout=10
    ) as response:
        certificate = requests_peer_certificate(response)

    assert certificate == der(test_pki.server.cert_pem)


def test_requests_after_body_read_is_rejected(
    uvicorn_factory: UvicornFactory, test_pki: TestPKI
) -> None:
    server = uvicorn_factory.app(SAMPLE_APP, tls=test_pki.server, ca_path=test_pki.ca.cert_path)

    # Without stream=True urllib3 has already returned the connection to its pool.
    response = requests.get(server.url + "/healthz", verify=str(test_pki.ca.cert_path), timeout=10)

    with pytest.raises(ProtocolError, match="no TLS connection under the answer from"):
        requests_peer_certificate(response)


def test_plain_http_has_no_certificate(uvicorn_factory: UvicornFactory) -> None:
    server = uvicorn_factory.app(SAMPLE_APP)

    with httpx.Client() as client:
        response = client.get(server.url + "/healthz")

    with pytest.raises(ProtocolError, match="no TLS connection under the answer from"):
        httpx_peer_certificate(response)
