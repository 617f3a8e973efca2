"""The verifier served by ``device-sdk verifier serve`` under uvicorn, over real HTTP.

Covers the single use of a challenge across two verifier processes (sharing SQLite, then Redis),
the broker webhooks over HTTP, and a real RabbitMQ delegating MQTT logins to the verifier.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from fixtures_services import (
    HOST,
    HTTPServer,
    RabbitMQ,
    RedisServer,
    TestPKI,
    UvicornFactory,
    free_port,
)
from fixtures_verifier import make_csr, make_key

from device_sdk.auth import Challenge, build_assertion, device_id_of, tls_server_end_point
from device_sdk.auth.assertion import PrivateKey
from device_sdk.cli.main import main as cli_main
from device_sdk.verifier import (
    SQLiteChallengeStore,
    SQLiteDeviceRegistry,
    Verifier,
    VerifierConfig,
)

ISSUER = "http://verifier.test"
TOKEN_URL = ISSUER + "/v1/token"
PARALLEL_USES = 32

# paho 2 reports MQTT 3.1.1 CONNACK code 4 as reason code 134.
BAD_USERNAME_OR_PASSWORD = 134


@dataclass
class EnrolledDevice:
    key: PrivateKey
    device_id: str


def create_enrollment_token(db: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    status = cli_main(["verifier", "enrollment-token", "create", "--db", str(db)])
    assert status == 0
    token = capsys.readouterr().out.strip()
    assert len(token) == 43
    return token


def serve_verifier(
    factory: UvicornFactory,
    db: Path,
    *extra: str,
    port: int | None = None,
    ca_path: Path | None = None,
) -> HTTPServer:
    port = port or free_port()
    argv = [
        sys.executable, "-m", "device_sdk", "verifier", "serve", "--db", str(db),
        "--host", HOST, "--port", str(port), "--log-level", "warning", *extra,
    ]
    scheme = "https" if "--tls-cert" in extra else "http"
    return factory.command(
        argv, port=port, scheme=scheme, ca_path=ca_path, name=f"verifier:{port}"
    )


def enroll_over_http(server: HTTPServer, token: str, **client_options: object) -> EnrolledDevice:
    key = make_key("ES256")
    body = {
        "csr": make_csr(key).decode(),
        "enrollment_token": token,
        "backend": "software",
        "hardware_backed": False,
    }
    response = httpx.post(server.url + "/v1/enroll", json=body, timeout=10, **client_options)  # type: ignore[arg-type]
    assert response.status_code == 201, response.text
    return EnrolledDevice(key, response.json()["device"]["device_id"])


def challenge_over_http(
    server: HTTPServer, device: EnrolledDevice, audience: str, **client_options: object
) -> Challenge:
    response = httpx.post(
        server.url + "/v1/challenges",
        json={"device_id": device.device_id, "audience": audience},
        timeout=10,
        **client_options,  # type: ignore[arg-type]
    )
    assert response.status_code == 200, response.text
    return Challenge.from_json(response.json())


def spend_in_parallel(servers: list[HTTPServer], assertion: str) -> list[int]:
    """POST one assertion PARALLEL_USES times at once, spread over ``servers``; return statuses."""
    barrier = threading.Barrier(PARALLEL_USES)
    statuses: list[int] = [0] * PARALLEL_USES
    clients = [httpx.Client(timeout=30) for _ in range(PARALLEL_USES)]

    def use(index: int) -> None:
        server = servers[index % len(servers)]
        client = clients[index]
        # Open the connection first, so the requests leave as close together as possible.
        client.get(server.url + "/healthz")
        barrier.wait(timeout=60)
        response = client.post(server.url + "/v1/token", json={"assertion": assertion})
        statuses[index] = response.status_code

    threads = [threading.Thread(target=use, args=(index,)) for index in range(PARALLEL_USES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for client in clients:
        client.close()
    return statuses


def replayed_count(servers: list[HTTPServer]) -> int:
    return sum(
        server.process.log_path.read_text().count("reason=replayed") for server in servers
    )


def check_single_use(
    uvicorn_factory: UvicornFactory,
    db: Path,
    capsys: pytest.CaptureFixture[str],
    *extra: str,
) -> None:
    first = serve_verifier(uvicorn_factory, db, "--issuer", ISSUER, "--no-rate-limits", *extra)
    # Started one after the other, so the second reads the signing key the first wrote.
    second = serve_verifier(uvicorn_factory, db, "--issuer", ISSUER, "--no-rate-limits", *extra)
    device = enroll_over_http(first, create_enrollment_token(db, capsys))
    challenge = challenge_over_http(second, device, ISSUER)
    assertion = build_assertion(
        device.key, challenge, channel_binding=None, htm="POST", htu=TOKEN_URL
    )

    statuses = spend_in_parallel([first, second], assertion)

    assert statuses.count(200) == 1
    assert statuses.count(401) == PARALLEL_USES - 1
    assert replayed_count([first, second]) == PARALLEL_USES - 1


@pytest.mark.slow
def test_single_use_across_processes_sqlite(
    uvicorn_factory: UvicornFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    check_single_use(uvicorn_factory, tmp_path / "verifier.db", capsys)


@pytest.mark.slow
def test_single_use_across_processes_redis(
    uvicorn_factory: UvicornFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    redis_server: RedisServer,
    redis_client,  # type: ignore[no-untyped-def]
) -> None:
    check_single_use(
        uvicorn_factory, tmp_path / "verifier.db", capsys, "--redis", redis_server.url
    )

    assert redis_client.keys("device-sdk:challenge:*") != []


# TLS, the CLI's channel binding and the protected endpoint


def test_tls_login_and_whoami(
    uvicorn_factory: UvicornFactory,
    tmp_path: Path,
    test_pki: TestPKI,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "verifier.db"
    server = serve_verifier(
        uvicorn_factory, db,
        "--tls-cert", str(test_pki.server.cert_path), "--tls-key", str(test_pki.server.key_path),
        ca_path=test_pki.ca.cert_path,
    )
    context = test_pki.client_ssl_context()
    device = enroll_over_http(server, create_enrollment_token(db, capsys), verify=context)
    der = serialization.Encoding.DER
    binding = tls_server_end_point(test_pki.server.certificate.public_bytes(der))
    proxy_binding = tls_server_end_point(test_pki.other_server.certificate.public_bytes(der))

    def login(channel_binding: bytes) -> httpx.Response:
        challenge = challenge_over_http(server, device, server.url, verify=context)
        assertion = build_assertion(
            device.key, challenge, channel_binding=channel_binding,
            htm="POST", htu=server.url + "/v1/token",
        )
        return httpx.post(
            server.url + "/v1/token", json={"assertion": assertion}, verify=context, timeout=10
        )

    relayed = login(proxy_binding)
    direct = login(binding)

    assert relayed.status_code == 401
    assert direct.status_code == 200
    token = direct.json()["access_token"]
    whoami = httpx.get(
        server.url + "/v1/whoami",
        headers={"Authorization": f"Bearer {token}"},
        verify=context,
        timeout=10,
    )
    assert whoami.status_code == 200
    assert whoami.json()["device_id"] == device.device_id
    assert "reason=channel_binding_mismatch" in server.process.log_path.read_text()


# Broker webhooks over HTTP


def mqtt_password(server: HTTPServer, device: EnrolledDevice, broker_url: str) -> str:
    challenge = challenge_over_http(server, device, broker_url)
    return build_assertion(device.key, challenge, channel_binding=None)


def test_webhooks_of_named_brokers(
    uvicorn_factory: UvicornFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = "mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1884"
    db = tmp_path / "verifier.db"
    server = serve_verifier(
        uvicorn_factory, db, "--broker-audience", first, "--broker-audience", second
    )
    device = enroll_over_http(server, create_enrollment_token(db, capsys))
    form = {"username": device.device_id, "password": mqtt_password(server, device, first)}

    at_second = httpx.post(
        server.url + "/v1/brokers/127.0.0.1:1884/auth/rabbitmq/user", data=form, timeout=10
    )
    at_first = httpx.post(
        server.url + "/v1/brokers/127.0.0.1:1883/auth/rabbitmq/user", data=form, timeout=10
    )

    assert at_second.text == "deny"
    assert at_first.text == "allow"
    log = server.process.log_path.read_text()
    assert (
        f"webhooks of broker {first}: {server.url}/v1/brokers/127.0.0.1:1883/auth/rabbitmq "
        "and .../auth/emqx"
    ) in log
    assert "warning: /v1/broker/auth/ accepts a password minted for any of these brokers" in log


def test_webhooks_over_http(
    uvicorn_factory: UvicornFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broker_url = "mqtt://127.0.0.1:1883"
    db = tmp_path / "verifier.db"
    server = serve_verifier(uvicorn_factory, db, "--broker-audience", broker_url)
    device = enroll_over_http(server, create_enrollment_token(db, capsys))
    rabbitmq = server.url + "/v1/broker/auth/rabbitmq"

    password = mqtt_password(server, device, broker_url)
    user_form = {"username": device.device_id, "password": password, "vhost": "/",
                 "client_id": "sensor-1"}
    allowed = httpx.post(rabbitmq + "/user", data=user_form, timeout=10)
    replayed = httpx.post(rabbitmq + "/user", data=user_form, timeout=10)
    vhost = httpx.post(
        rabbitmq + "/vhost",
        data={"username": device.device_id, "vhost": "/", "ip": "127.0.0.1"},
        timeout=10,
    )
    topic = httpx.post(
        rabbitmq + "/topic",
        data={"username": device.device_id, "vhost": "/", "resource": "topic",
              "name": "amq.topic", "permission": "write", "routing_key": "a.b"},
        timeout=10,
    )
    emqx_body = {"username": device.device_id,
                 "password": mqtt_password(server, device, broker_url), "clientid": "sensor-1"}
    emqx_allowed = httpx.post(server.url + "/v1/broker/auth/emqx", json=emqx_body, timeout=10)
    emqx_replayed = httpx.post(server.url + "/v1/broker/auth/emqx", json=emqx_body, timeout=10)

    assert (allowed.status_code, allowed.text) == (200, "allow")
    assert (replayed.status_code, replayed.text) == (200, "deny")
    assert vhost.text == "allow"
    assert topic.text == "allow"
    assert emqx_allowed.json() == {"result": "allow", "is_superuser": False}
    assert emqx_replayed.json() == {"result": "deny"}


# A real RabbitMQ delegating MQTT logins to the verifier


def mqtt_session(port: int, username: str, password: str) -> tuple[int, bytes | None]:
    """Connect over MQTT 3.1.1, then subscribe and publish once if the login succeeds.

    Returns the CONNACK reason code and the payload that came back from the subscription.
    """
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.username_pw_set(username, password)
    connected = threading.Event()
    subscribed = threading.Event()
    received = threading.Event()
    result: dict[str, object] = {}

    def on_connect(client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        result["code"] = reason_code.value
        connected.set()

    def on_subscribe(client, userdata, mid, reason_codes, properties):  # type: ignore[no-untyped-def]
        subscribed.set()

    def on_message(client, userdata, message):  # type: ignore[no-untyped-def]
        result["payload"] = message.payload
        received.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(HOST, port, keepalive=10)
    client.loop_start()
    try:
        assert connected.wait(20), "no CONNACK within 20 s"
        if result["code"] == 0:
            client.subscribe("devices/test", qos=1)
            assert subscribed.wait(20), "no SUBACK within 20 s"
            client.publish("devices/test", b"hello", qos=1)
            assert received.wait(20), "published message did not come back within 20 s"
    finally:
        client.disconnect()
        client.loop_stop()
    payload = result.get("payload")
    return int(result["code"]), payload if isinstance(payload, bytes) else None  # type: ignore[call-overload]


@pytest.mark.slow
def test_rabbitmq_delegates_to_verifier(
    uvicorn_factory: UvicornFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rabbitmq_factory,  # type: ignore[no-untyped-def]
) -> None:
    db = tmp_path / "verifier.db"
    port = free_port()
    broker: RabbitMQ = rabbitmq_factory(f"http://{HOST}:{port}/v1/broker/auth/rabbitmq")
    server = serve_verifier(
        uvicorn_factory, db, "--broker-audience", broker.mqtt_url, port=port
    )
    device = enroll_over_http(server, create_enrollment_token(db, capsys))
    password = mqtt_password(server, device, broker.mqtt_url)

    first = mqtt_session(broker.mqtt_port, device.device_id, password)
    replay = mqtt_session(broker.mqtt_port, device.device_id, password)
    status = cli_main(["verifier", "devices", "revoke", "--db", str(db), device.device_id])

    assert first == (0, b"hello")
    assert replay == (BAD_USERNAME_OR_PASSWORD, None)
    assert status == 0
    revoked = httpx.post(
        server.url + "/v1/challenges",
        json={"device_id": device.device_id, "audience": broker.mqtt_url},
        timeout=10,
    )
    assert revoked.status_code == 401
    log = server.process.log_path.read_text()
    assert "reason=replayed" in log
    assert "reason=revoked_device" in log


def test_serve_rejects_tls_cert_without_key(
    tmp_path: Path, test_pki: TestPKI, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli_main([
        "verifier", "serve", "--db", str(tmp_path / "v.db"),
        "--tls-cert", str(test_pki.server.cert_path),
    ])

    assert status == 1
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err


def test_enrollment_token_json_and_devices_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "verifier.db"
    assert cli_main(["verifier", "enrollment-token", "create", "--db", str(db), "--count", "3",
                     "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    verifier = Verifier(
        VerifierConfig(issuer=ISSUER),
        registry=SQLiteDeviceRegistry(db),
        challenges=SQLiteChallengeStore(db),
    )
    key = make_key("ES256")
    record, _ = verifier.enroll(make_csr(key), created["tokens"][2], "software", False)
    verifier.close()

    assert cli_main(["verifier", "devices", "list", "--db", str(db), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert cli_main(["verifier", "devices", "show", "--db", str(db), record.device_id]) == 0
    shown = capsys.readouterr().out
    assert cli_main(["verifier", "devices", "revoke", "--db", str(db), record.device_id]) == 0
    revoked = capsys.readouterr().out
    assert cli_main(["verifier", "devices", "show", "--db", str(db), "--json",
                     record.device_id]) == 0
    after = json.loads(capsys.readouterr().out)
    missing = cli_main(["verifier", "devices", "list", "--db", str(tmp_path / "none.db")])

    assert len(created["tokens"]) == 3
    assert len(set(created["tokens"])) == 3
    assert isinstance(created["expires_at"], int)
    assert [entry["device_id"] for entry in listed] == [device_id_of(key)]
    assert f"device_id: {record.device_id}" in shown
    assert "status: active" in shown
    assert revoked.startswith(f"revoked {record.device_id} at ")
    assert after["status"] == "revoked"
    assert missing == 1
    assert "no verifier database" in capsys.readouterr().err
