"""MQTT connects with a signed assertion against plain password connects, in one run.

Starts, on 127.0.0.1 and in a temporary directory:

- RabbitMQ 3.10 with rabbitmq_mqtt, whose auth backends are ``internal`` then ``http``: a plain
  user in RabbitMQ's own database logs in without leaving the broker, and a device falls through
  to the verifier's webhook;
- the verifier (``device-sdk verifier serve``) twice: over plain HTTP for the RabbitMQ webhook,
  and over TLS on another database for the HTTP measurements;
- a SoftHSM token with a P-256 device key.

MQTT: each signed connect fetches a challenge over HTTP, signs the assertion in SoftHSM, sends
CONNECT and waits for CONNACK while RabbitMQ calls the verifier. Each plain connect sends a
fixed password that RabbitMQ checks itself. Both disconnect after the CONNACK. HTTP: a first
authenticated request (new client: TLS handshake, challenge, token, then the request) against a
first unauthenticated request (new client: TLS handshake and the request).

Usage: ``python bench/connect.py [--json] [--count N]``. The figures depend on the machine and
on whatever else runs on it; compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS_DIR))

import httpx  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from fixtures_services import (  # noqa: E402
    HOST,
    RabbitMQ,
    UvicornFactory,
    free_port,
    issue_server_certificate,
    make_ca,
)
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

PLAIN_USER = "bench-plain"
WEBHOOK_PATH = "/v1/broker/auth/rabbitmq"


class BenchRabbitMQ(RabbitMQ):
    """RabbitMQ with the internal user database first and the HTTP backend second."""

    plain_password = ""

    def _write_files(self) -> None:
        super()._write_files()
        self.plain_password = secrets.token_urlsafe(16)
        definitions = self.directory / "definitions.json"
        definitions.write_text(json.dumps(_definitions(PLAIN_USER, self.plain_password)))
        definitions.chmod(0o600)
        config = self.directory / "rabbitmq.conf"
        text = config.read_text().replace(
            "auth_backends.1 = http\n", "auth_backends.1 = internal\nauth_backends.2 = http\n"
        )
        config.write_text(text + f"load_definitions = {definitions}\n")


def _definitions(user: str, password: str) -> dict[str, Any]:
    """RabbitMQ definitions with one user; its password is stored as a salted SHA-256 hash."""
    salt = secrets.token_bytes(4)
    digest = hashlib.sha256(salt + password.encode()).digest()
    return {
        "users": [{
            "name": user,
            "password_hash": base64.b64encode(salt + digest).decode(),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": [],
        }],
        "vhosts": [{"name": "/"}],
        "permissions": [
            {"user": user, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
        ],
    }


def verifier_argv(db: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "device_sdk", "verifier", "serve", "--db", str(db),
        "--host", HOST, "--port", str(port), "--no-rate-limits", "--log-level", "warning",
        *extra,
    ]


def create_device_key(directory: Path) -> Any:
    from device_sdk.keys import softhsm

    store = softhsm.create_store(directory / "softhsm")
    # SoftHSM reads its config when the library is first loaded, which happens below.
    os.environ.update(store.environment())
    token = softhsm.init_token(store, "bench")
    uri = token.key_uri(label="device")
    from device_sdk.keys import open_key
    from device_sdk.keys.pkcs11 import generate_key

    generate_key(uri, "ec-p256")
    return open_key(uri)


def enroll(db: Path, key: Any) -> None:
    sys.path.insert(0, str(TESTS_DIR))
    from fixtures_verifier import make_csr

    from device_sdk.verifier import Verifier, VerifierConfig

    verifier = Verifier.open(db, VerifierConfig(issuer="http://127.0.0.1"))
    try:
        token = verifier.create_enrollment_tokens()[0]
        verifier.enroll(make_csr(key), token, "pkcs11", False)
    finally:
        verifier.close()


def plain_connect(port: int, password: str, client_id: str) -> float:
    """Connect with a fixed password, wait for CONNACK, disconnect; return seconds taken."""
    started = time.perf_counter()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.username_pw_set(PLAIN_USER, password)
    accepted = threading.Event()
    codes: list[int] = []

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        codes.append(reason.value)
        accepted.set()

    client.on_connect = on_connect
    client.connect(HOST, port, keepalive=30)
    deadline = time.monotonic() + 10
    while not accepted.is_set() and time.monotonic() < deadline:
        client.loop(0.05)
    if codes != [0]:
        raise RuntimeError(f"plain connect failed: CONNACK reason codes {codes} (none: timed out)")
    elapsed = time.perf_counter() - started
    client.disconnect()
    client.loop(0.05)
    return elapsed


def signed_connect(client: Any) -> float:
    """Fetch a challenge, sign, connect, wait for CONNACK, disconnect; return seconds taken."""
    started = time.perf_counter()
    client.connect_once()
    elapsed = time.perf_counter() - started
    client.paho.disconnect()
    client.paho.loop(0.05)
    return elapsed


def summarise(seconds: list[float]) -> dict[str, float]:
    total = sum(seconds)
    return {
        "per_second": round(len(seconds) / total, 1),
        "median_ms": round(statistics.median(seconds) * 1000, 2),
        "p95_ms": round(sorted(seconds)[int(len(seconds) * 0.95) - 1] * 1000, 2),
    }


def bench_mqtt(directory: Path, key: Any, count: int) -> dict[str, Any]:
    from device_sdk.mqtt import DeviceMqttClient

    verifier_port = free_port()
    (directory / "rabbit").mkdir()
    rabbit = BenchRabbitMQ(f"http://{HOST}:{verifier_port}{WEBHOOK_PATH}", directory / "rabbit")
    factory = UvicornFactory(directory)
    db = directory / "mqtt-verifier.db"
    try:
        rabbit.start()
        factory.command(
            verifier_argv(db, verifier_port, "--broker-audience", rabbit.mqtt_url),
            port=verifier_port,
            name="verifier (webhook)",
        )
        enroll(db, key)
        http_client = httpx.Client(timeout=10)
        device = DeviceMqttClient(
            key, rabbit.mqtt_url, verifier_url=f"http://{HOST}:{verifier_port}",
            http_client=http_client, clean_session=True,
        )

        # Warm both paths: first connections create queues, caches and the Erlang processes.
        for _ in range(3):
            plain_connect(rabbit.mqtt_port, rabbit.plain_password, "bench-plain")
            signed_connect(device)

        # Interleaved, so that a slow phase of the machine hits both sides alike.
        plain: list[float] = []
        signed: list[float] = []
        for _ in range(count):
            plain.append(plain_connect(rabbit.mqtt_port, rabbit.plain_password, "bench-plain"))
            signed.append(signed_connect(device))
        http_client.close()
    finally:
        factory.stop_all()
        rabbit.stop()

    plain_summary, signed_summary = summarise(plain), summarise(signed)
    return {
        "broker": "RabbitMQ 3.10, rabbitmq_mqtt, auth backends internal then http",
        "connects": count,
        "plain_password": plain_summary,
        "signed_assertion": signed_summary,
        "ratio_signed_to_plain_per_second": round(
            signed_summary["per_second"] / plain_summary["per_second"], 3
        ),
    }


def bench_http(directory: Path, key: Any, count: int) -> dict[str, Any]:
    from device_sdk.http import DeviceAuth

    pki_dir = directory / "pki"
    pki_dir.mkdir()
    ca, ca_key = make_ca(pki_dir)
    server = issue_server_certificate(pki_dir, "server", ca.certificate, ca_key)
    port = free_port()
    db = directory / "http-verifier.db"
    factory = UvicornFactory(directory)
    url = f"https://{HOST}:{port}"
    try:
        factory.command(
            verifier_argv(
                db, port, "--tls-cert", str(server.cert_path), "--tls-key", str(server.key_path)
            ),
            port=port,
            scheme="https",
            ca_path=ca.cert_path,
            name="verifier (https)",
        )
        enroll(db, key)
        import ssl

        context = ssl.create_default_context(cafile=str(ca.cert_path))

        def unauthenticated() -> float:
            started = time.perf_counter()
            with httpx.Client(verify=context) as client:
                response = client.get(url + "/healthz")
            if response.status_code != 200:
                raise RuntimeError(f"GET /healthz returned HTTP {response.status_code}")
            return time.perf_counter() - started

        def first_authenticated() -> float:
            started = time.perf_counter()
            with httpx.Client(verify=context, auth=DeviceAuth(key, url)) as client:
                response = client.get(url + "/v1/whoami")
            if response.status_code != 200:
                raise RuntimeError(f"GET /v1/whoami returned HTTP {response.status_code}")
            return time.perf_counter() - started

        for _ in range(3):
            unauthenticated()
            first_authenticated()
        plain: list[float] = []
        signed: list[float] = []
        for _ in range(count):
            plain.append(unauthenticated())
            signed.append(first_authenticated())
    finally:
        factory.stop_all()

    plain_summary, signed_summary = summarise(plain), summarise(signed)
    return {
        "requests": count,
        "unauthenticated_first_request": plain_summary,
        "authenticated_first_request": signed_summary,
        "ratio_authenticated_to_unauthenticated_time": round(
            signed_summary["median_ms"] / plain_summary["median_ms"], 3
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--count", type=int, default=200, help="connects and requests per side (default: 200)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="device-sdk-bench-") as temporary:
        directory = Path(temporary)
        directory.chmod(0o755)
        key = create_device_key(directory)
        result = {
            "machine": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
            },
            "key": "SoftHSM 2 P-256 (software token)",
            "mqtt": bench_mqtt(directory, key, args.count),
            "http": bench_http(directory, key, args.count),
        }

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        mqtt_result, http_result = result["mqtt"], result["http"]
        print(
            f"MQTT connects/s: plain {mqtt_result['plain_password']['per_second']}, signed "
            f"{mqtt_result['signed_assertion']['per_second']}, ratio "
            f"{mqtt_result['ratio_signed_to_plain_per_second']}"
        )
        print(
            f"HTTP first request median: unauthenticated "
            f"{http_result['unauthenticated_first_request']['median_ms']} ms, authenticated "
            f"{http_result['authenticated_first_request']['median_ms']} ms, ratio "
            f"{http_result['ratio_authenticated_to_unauthenticated_time']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
