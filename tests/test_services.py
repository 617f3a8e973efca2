"""Each service fixture starts its server on loopback, and the server responds."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator

import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from fixtures_services import (
    HOST,
    Mosquitto,
    Postgres,
    RabbitMQ,
    RedisServer,
    TestPKI,
    UvicornFactory,
    free_port,
)

# paho 2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes: 4 becomes 134, 5 becomes 135.
BAD_USERNAME_OR_PASSWORD = 134
NOT_AUTHORIZED = 135


def mqtt_connect(port: int, username: str | None = None, password: str | None = None) -> int:
    """Connect with paho over MQTT 3.1.1 and return the CONNACK reason code as an int."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    if username is not None:
        client.username_pw_set(username, password)
    result: dict[str, int] = {}
    done = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        result["code"] = reason_code.value
        done.set()

    client.on_connect = on_connect
    client.connect(HOST, port, keepalive=10)
    client.loop_start()
    try:
        assert done.wait(15), "no CONNACK within 15 s"
    finally:
        client.disconnect()
        client.loop_stop()
    return result["code"]


def test_redis_set_and_get(redis_server: RedisServer, redis_client) -> None:  # type: ignore[no-untyped-def]
    assert redis_client.set("greeting", b"hello") is True
    assert redis_client.get("greeting") == b"hello"
    assert redis_client.config_get("save") == {"save": ""}
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"


def test_redis_client_starts_empty(redis_client) -> None:  # type: ignore[no-untyped-def]
    assert redis_client.dbsize() == 0


def test_mosquitto_anonymous_connect(mosquitto: Mosquitto) -> None:
    assert mqtt_connect(mosquitto.port) == 0


def test_mosquitto_password_file_after_restart(mosquitto: Mosquitto) -> None:
    password_file = mosquitto.set_password_file({"device-1": "correct horse"})
    mosquitto.restart()

    assert mqtt_connect(mosquitto.port, "device-1", "correct horse") == 0
    assert mqtt_connect(mosquitto.port, "device-1", "wrong") == NOT_AUTHORIZED
    assert mqtt_connect(mosquitto.port) == NOT_AUTHORIZED
    assert "correct horse" not in password_file.read_text()
    assert password_file.stat().st_mode & 0o777 == 0o600


def test_mosquitto_tls_listener(mosquitto: Mosquitto, test_pki: TestPKI) -> None:
    port = mosquitto.add_tls_listener(test_pki.server.cert_pem, test_pki.server.key_pem)
    mosquitto.restart()

    context = test_pki.client_ssl_context()
    with socket.create_connection((HOST, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=HOST) as tls:
            peer = tls.getpeercert(binary_form=True)
    assert peer == test_pki.server.certificate.public_bytes(serialization.Encoding.DER)


class AuthBackend(http.server.BaseHTTPRequestHandler):
    """RabbitMQ HTTP auth backend stand-in: allows user "device" with password "secret"."""

    requests: list[tuple[str, dict[str, list[str]]]] = []

    def do_POST(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        length = int(self.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        self.requests.append((self.path, form))
        allowed = True
        if self.path.endswith("/user"):
            allowed = form.get("username") == ["device"] and form.get("password") == ["secret"]
        body = b"allow" if allowed else b"deny"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def auth_backend() -> Iterator[str]:
    AuthBackend.requests = []
    server = http.server.ThreadingHTTPServer((HOST, free_port()), AuthBackend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_port}/auth"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_rabbitmq_delegates_login_and_restarts(rabbitmq_factory, auth_backend: str) -> None:  # type: ignore[no-untyped-def]
    broker: RabbitMQ = rabbitmq_factory(auth_backend)

    assert mqtt_connect(broker.mqtt_port, "device", "secret") == 0
    assert mqtt_connect(broker.mqtt_port, "device", "wrong") == BAD_USERNAME_OR_PASSWORD
    user_checks = [form for path, form in AuthBackend.requests if path == "/auth/user"]
    assert user_checks[0]["username"] == ["device"]
    assert user_checks[0]["vhost"] == ["/"]
    assert "client_id" in user_checks[0]

    old_port = broker.mqtt_port
    broker.restart()
    assert broker.mqtt_port == old_port
    assert mqtt_connect(broker.mqtt_port, "device", "secret") == 0


def test_postgres_query(postgres_server: Postgres) -> None:
    import psycopg

    with psycopg.connect(postgres_server.dsn, connect_timeout=10) as connection:
        row = connection.execute("SELECT 1 + 1, current_setting('listen_addresses')").fetchone()
    assert row == (2, "127.0.0.1")


def test_uvicorn_http(uvicorn_factory: UvicornFactory) -> None:
    server = uvicorn_factory.app("fixtures_services:create_sample_app")

    response = httpx.get(server.url + "/healthz", timeout=10)

    assert response.status_code == 200
    assert response.text == "ok"


def test_uvicorn_tls_and_restart(uvicorn_factory: UvicornFactory, test_pki: TestPKI) -> None:
    server = uvicorn_factory.app(
        "fixtures_services:create_sample_app", tls=test_pki.server, ca_path=test_pki.ca.cert_path
    )
    context = test_pki.client_ssl_context()

    assert httpx.get(server.url + "/healthz", verify=context, timeout=10).text == "ok"
    server.stop()
    server.start()
    assert httpx.get(server.url + "/missing", verify=context, timeout=10).status_code == 404


def test_pki_certificates_differ(test_pki: TestPKI) -> None:
    server = test_pki.server.certificate
    other = test_pki.other_server.certificate

    assert server.fingerprint(hashes.SHA256()) != other.fingerprint(hashes.SHA256())
    assert server.issuer == test_pki.ca.certificate.subject
    assert other.issuer == test_pki.ca.certificate.subject
    assert os.stat(test_pki.server.key_path).st_mode & 0o777 == 0o600
    assert os.stat(test_pki.other_server.key_path).st_mode & 0o777 == 0o600
