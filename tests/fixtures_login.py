"""Fixtures for the device login tests: a served verifier, SoftHSM devices, RabbitMQ, amqtt.

The verifier runs as ``device-sdk verifier serve`` under uvicorn in its own process, on a SQLite
database that the test process also opens to enroll devices (SQLite serialises the writers).

- ``https_verifier``: a :class:`VerifierServer` over TLS with the test PKI's server certificate
- ``device_key``: a fresh P-256 key on the SoftHSM token; ``software_key``: a software key
- ``rabbit_stack`` (module): RabbitMQ whose MQTT logins go to a plain-HTTP verifier
- ``amqtt_stack``: an HTTPS verifier and an embedded amqtt broker over TLS on the same database
- :class:`InterceptingProxy`: a TLS-terminating proxy with a certificate of its own
- :func:`create_header_echo_app`: an ASGI app that returns the Authorization header it got
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fixtures_services import (
    HOST,
    CertifiedKey,
    HTTPServer,
    RabbitMQ,
    TestPKI,
    UvicornFactory,
    free_port,
)
from fixtures_verifier import make_csr, make_key

from device_sdk.auth import device_id_of
from device_sdk.verifier import Verifier, VerifierConfig, channel_bindings_from_pem
from device_sdk.verifier.amqtt_plugin import broker_config

RABBITMQ_WEBHOOK_PATH = "/v1/broker/auth/rabbitmq"

# Enrollment and revocation never check an assertion, so this issuer is unused.
MANAGEMENT_ISSUER = "http://127.0.0.1"


@dataclass
class VerifierServer:
    """A verifier served by uvicorn, and the database it shares with the test."""

    server: HTTPServer
    db_path: Path
    issuer: str

    @property
    def url(self) -> str:
        return self.server.url

    def enroll(self, key: Any, backend: str = "pkcs11") -> str:
        """Register ``key`` as a device and return its device id."""
        verifier = Verifier.open(self.db_path, VerifierConfig(issuer=MANAGEMENT_ISSUER))
        try:
            token = verifier.create_enrollment_tokens()[0]
            record, _created = verifier.enroll(make_csr(key), token, backend, False)
        finally:
            verifier.close()
        return record.device_id

    def log_text(self) -> str:
        return self.server.process.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()


def serve_verifier(
    factory: UvicornFactory,
    directory: Path,
    *,
    port: int | None = None,
    tls: CertifiedKey | None = None,
    ca_path: Path | None = None,
    issuer: str | None = None,
    broker_audiences: tuple[str, ...] = (),
    access_token_lifetime: int = 300,
    extra_args: tuple[str, ...] = (),
) -> VerifierServer:
    """Start ``device-sdk verifier serve`` with rate limits off and wait until it responds."""
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    db_path = directory / "verifier.db"
    argv = [
        sys.executable, "-m", "device_sdk", "verifier", "serve",
        "--db", str(db_path), "--host", HOST, "--port", str(port),
        "--no-rate-limits", "--log-level", "info",
        "--access-token-lifetime", str(access_token_lifetime),
    ]
    if tls is not None:
        argv += ["--tls-cert", str(tls.cert_path), "--tls-key", str(tls.key_path)]
    if issuer is not None:
        argv += ["--issuer", issuer]
    for audience in broker_audiences:
        argv += ["--broker-audience", audience]
    argv += list(extra_args)
    server = factory.command(
        argv,
        port=port,
        scheme="https" if tls else "http",
        ca_path=ca_path,
        name="device-sdk verifier",
    )
    scheme = "https" if tls else "http"
    return VerifierServer(server, db_path, issuer or f"{scheme}://{HOST}:{port}")


@pytest.fixture
def https_verifier(
    uvicorn_factory: UvicornFactory, test_pki: TestPKI, tmp_path: Path
) -> VerifierServer:
    """A verifier over TLS with the test PKI's server certificate; its issuer is its own URL."""
    return serve_verifier(
        uvicorn_factory, tmp_path, tls=test_pki.server, ca_path=test_pki.ca.cert_path
    )


@pytest.fixture
def device_key(softhsm_key_uri: str) -> Any:
    """A fresh P-256 key on the SoftHSM token, opened through the PKCS#11 backend."""
    from device_sdk.keys import open_key

    return open_key(softhsm_key_uri)


@pytest.fixture
def software_key() -> Any:
    """A software P-256 key, for a second device or a key the verifier has never seen."""
    key = make_key("ES256")
    assert device_id_of(key)
    return key


@dataclass
class RabbitStack:
    """RabbitMQ whose MQTT logins go to a plain-HTTP verifier on loopback."""

    rabbit: RabbitMQ
    verifier: VerifierServer

    @property
    def broker_url(self) -> str:
        return self.rabbit.mqtt_url


@pytest.fixture(scope="module")
def rabbit_stack(
    rabbitmq_factory: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RabbitStack]:
    """One RabbitMQ node and one verifier for a test module (a RabbitMQ start takes about 9 s).

    The verifier port is chosen first, because RabbitMQ needs the webhook URL when it starts and
    the verifier needs the broker URL as an audience. The webhook is plain HTTP on loopback,
    because RabbitMQ's HTTP auth backend here has no CA for the test PKI.
    """
    directory = tmp_path_factory.mktemp("rabbit-stack")
    port = free_port()
    rabbit = rabbitmq_factory(f"http://{HOST}:{port}{RABBITMQ_WEBHOOK_PATH}")
    factory = UvicornFactory(directory)
    try:
        verifier = serve_verifier(
            factory, directory, port=port, broker_audiences=(rabbit.mqtt_url,)
        )
        yield RabbitStack(rabbit, verifier)
    finally:
        factory.stop_all()


class InterceptingProxy:
    """A TLS-terminating proxy: presents its own certificate and relays to an upstream TLS server.

    The device trusts the proxy's certificate (same CA), as it would trust a corporate or
    attacker proxy whose CA was installed, so only the channel binding can reveal it. The relay
    runs on an asyncio loop in a background thread; ``upstream_port`` may be set after start.
    """

    def __init__(
        self, certificate: CertifiedKey, upstream_port: int, upstream_context: ssl.SSLContext
    ) -> None:
        self.certificate = certificate
        self.upstream_port = upstream_port
        self.upstream_context = upstream_context
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"

    def start(self) -> None:
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(self.certificate.cert_path, self.certificate.key_path)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, HOST, 0, ssl=server_context), self._loop
        )
        self._server = future.result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                HOST, self.upstream_port, ssl=self.upstream_context, server_hostname=HOST
            )
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            _pipe(reader, upstream_writer), _pipe(upstream_reader, writer), return_exceptions=True
        )

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with suppress(OSError):
            writer.close()


class TLSBroker:
    """An amqtt broker with a TLS listener, on its own event loop in a background thread."""

    def __init__(self, verifier: Verifier, port: int, certificate_path: Path, key_path: Path):
        from amqtt.broker import Broker

        settings = broker_config(verifier, host=HOST, port=port)
        settings["listeners"]["default"].update(
            {"ssl": True, "certfile": str(certificate_path), "keyfile": str(key_path)}
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def create() -> Any:
            # amqtt binds the broker to the running loop, so it is created on that loop.
            return Broker(settings)

        self.broker = self.run(create())
        self.run(self.broker.start())

    def run(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout=30)

    def stop(self) -> None:
        self.run(self.broker.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class AmqttStack:
    verifier: VerifierServer
    broker_url: str
    port: int
    pki: TestPKI

    def tls_context(self) -> ssl.SSLContext:
        return self.pki.client_ssl_context()


@pytest.fixture
def amqtt_stack(
    uvicorn_factory: UvicornFactory, test_pki: TestPKI, tmp_path: Path
) -> Iterator[AmqttStack]:
    port = free_port()
    broker_url = f"mqtts://{HOST}:{port}"
    server_cert = str(test_pki.server.cert_path)
    verifier = serve_verifier(
        uvicorn_factory, tmp_path, tls=test_pki.server, ca_path=test_pki.ca.cert_path,
        broker_audiences=(broker_url,),
        extra_args=("--broker-cert", broker_url, server_cert),
    )
    config = VerifierConfig(
        issuer=verifier.issuer,
        http_channel_bindings=channel_bindings_from_pem(server_cert),
        broker_audiences={broker_url: channel_bindings_from_pem(server_cert)},
        challenge_limit_per_device=None,
        challenge_limit_per_address=None,
        failure_limit_per_device=None,
    )
    in_process = Verifier.open(verifier.db_path, config)
    broker = TLSBroker(in_process, port, test_pki.server.cert_path, test_pki.server.key_path)
    try:
        yield AmqttStack(verifier, broker_url, port, test_pki)
    finally:
        broker.stop()
        in_process.close()


def create_header_echo_app() -> Any:
    """Return an ASGI app that answers every request with its Authorization header as JSON.

    ``GET /healthz`` returns ``ok`` for readiness; any other path returns
    ``{"authorization": <header value or null>}``. Serve it with
    ``uvicorn_factory.app("fixtures_login:create_header_echo_app")``.
    """

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization")
        if scope["path"] == "/healthz":
            body = b"ok"
        else:
            value = authorization.decode("latin-1") if authorization is not None else None
            body = json.dumps({"authorization": value}).encode()
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        })
        await send({"type": "http.response.body", "body": body})

    return app
