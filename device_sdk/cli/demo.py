"""``device-sdk demo``: the whole device login, end to end, on one machine with no configuration.

The demo makes a temporary directory with a throwaway CA and a SoftHSM token, starts the verifier
(SQLite, HTTPS with the throwaway CA) and the embedded amqtt broker with the verifier plugin on
free loopback ports, provisions one device by running ``device-sdk provision`` as a child
process, logs in over HTTP and MQTT, publishes a message and receives it back, and prints a
report with timings. Every child runs under :class:`~device_sdk.cli.processes.Supervisor`, so
the demo ends with no process left behind, also after Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_sdk.cli.processes import Supervisor, free_loopback_port, port_is_open
from device_sdk.errors import DeviceSDKError

HOST = "127.0.0.1"
TOKEN_LABEL = "demo-device"  # noqa: S105 (a token label, not a secret)
KEY_LABEL = "device-key"
START_TIMEOUT = 60.0
PROVISION_TIMEOUT = 120.0
MESSAGE_TIMEOUT = 10.0


class DemoError(DeviceSDKError):
    """A demo step failed; the message names the step and shows the child's output."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run verifier, broker and one provisioned device on this machine",
        description=(
            "Create a SoftHSM token, start the verifier and an MQTT broker on loopback ports, "
            "provision one device with `device-sdk provision`, log in over HTTP and MQTT, "
            "publish and receive a message, and stop everything. Needs no configuration; "
            "leaves nothing running and removes its temporary directory."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (logs, config, token) and print its path",
    )
    parser.set_defaults(handler=run)


@dataclass
class DemoReport:
    """What the demo did, with the time each step took in seconds."""

    ok: bool = False
    device_id: str | None = None
    backend: str | None = None
    hardware_backed: bool | None = None
    verifier_url: str | None = None
    broker_url: str | None = None
    http: dict[str, Any] = field(default_factory=lambda: {"success": False})
    mqtt: dict[str, Any] = field(default_factory=lambda: {"success": False})
    timings: dict[str, float] = field(default_factory=dict)
    directory: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "device_id": self.device_id,
            "key": {"backend": self.backend, "hardware_backed": self.hardware_backed},
            "hardware_backed": self.hardware_backed,
            "verifier_url": self.verifier_url,
            "broker_url": self.broker_url,
            "http": self.http,
            "mqtt": self.mqtt,
            "timings_ms": {name: round(value * 1000, 1) for name, value in self.timings.items()},
            "directory": self.directory,
            "error": self.error,
        }


Progress = Callable[[str], None]


# --- throwaway PKI ----------------------------------------------------------------------------


def _write_pki(directory: Path) -> tuple[Path, Path, Path]:
    """Write a CA and a server certificate for 127.0.0.1; return (ca, cert, key) paths."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-sdk demo CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    ca_path = directory / "ca.pem"
    cert_path = directory / "verifier.pem"
    key_path = directory / "verifier.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            server_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return ca_path, cert_path, key_path


# --- the demo ---------------------------------------------------------------------------------


@contextmanager
def _timed(report: DemoReport, name: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        report.timings[name] = time.monotonic() - started


class Demo:
    """One demo run in ``directory``; :meth:`run` fills :attr:`report`."""

    def __init__(self, directory: Path, progress: Progress) -> None:
        self.directory = directory
        self.progress = progress
        self.report = DemoReport(directory=str(directory))
        self.env = dict(os.environ)
        self.env["DEVICE_SDK_LOCK_DIR"] = str(directory / "locks")
        self.python = [sys.executable, "-m", "device_sdk"]

    def run(self, supervisor: Supervisor) -> None:
        report = self.report
        with _timed(report, "pki_and_token"):
            ca_path, cert_path, key_path = _write_pki(self.directory)
            key_uri = self._create_token()

        verifier_port, broker_port = free_loopback_port(), free_loopback_port()
        verifier_url = f"https://{HOST}:{verifier_port}"
        broker_url = f"mqtt://{HOST}:{broker_port}"
        report.verifier_url, report.broker_url = verifier_url, broker_url
        database = self.directory / "verifier.sqlite"

        with _timed(report, "verifier_start"):
            self._start_verifier(
                supervisor, database, verifier_port, broker_url, cert_path, key_path, ca_path
            )
        with _timed(report, "broker_start"):
            self._start_broker(
                supervisor, database, verifier_url, cert_path, broker_port, broker_url
            )
        with _timed(report, "enrollment_token"):
            token_file = self._create_enrollment_token(supervisor, database)
        with _timed(report, "provision"):
            config_path = self._provision(
                supervisor, key_uri, verifier_url, token_file, ca_path, broker_url
            )

        self._log_in(config_path)
        report.ok = bool(report.http["success"] and report.mqtt["success"])

    # --- steps --------------------------------------------------------------------------------

    def _create_token(self) -> str:
        from device_sdk.keys import softhsm

        store = softhsm.create_store(self.directory / "softhsm")
        self.env.update(store.environment())
        # The demo process opens the key itself later, with the same SoftHSM store.
        os.environ.update(store.environment())
        token = softhsm.init_token(store, TOKEN_LABEL)
        self.progress(f"created SoftHSM token {TOKEN_LABEL!r} in {store.directory}")
        return token.key_uri(label=KEY_LABEL)

    def _start_verifier(
        self,
        supervisor: Supervisor,
        database: Path,
        port: int,
        broker_url: str,
        cert_path: Path,
        key_path: Path,
        ca_path: Path,
    ) -> None:
        import httpx

        argv = [
            *self.python,
            "verifier",
            "serve",
            "--db",
            str(database),
            "--port",
            str(port),
            "--tls-cert",
            str(cert_path),
            "--tls-key",
            str(key_path),
            "--broker-audience",
            broker_url,
            "--log-level",
            "warning",
        ]
        child = supervisor.start("verifier", argv, env=self.env)
        self.progress(f"started verifier (PID {child.pid}) on https://{HOST}:{port}")

        def ready() -> bool:
            try:
                response = httpx.get(
                    f"https://{HOST}:{port}/healthz", verify=str(ca_path), timeout=1.0
                )
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        seconds = supervisor.wait_until(child, ready, timeout=START_TIMEOUT, what="HTTPS /healthz")
        self.progress(f"verifier ready after {seconds:.2f} s")

    def _start_broker(
        self,
        supervisor: Supervisor,
        database: Path,
        verifier_url: str,
        cert_path: Path,
        port: int,
        broker_url: str,
    ) -> None:
        argv = [
            sys.executable,
            "-m",
            "device_sdk.cli.demo_broker",
            "--db",
            str(database),
            "--issuer",
            verifier_url,
            "--issuer-cert",
            str(cert_path),
            "--port",
            str(port),
            "--audience",
            broker_url,
        ]
        child = supervisor.start("broker", argv, env=self.env)
        self.progress(f"started MQTT broker (PID {child.pid}) on {broker_url}")
        seconds = supervisor.wait_until(
            child, lambda: port_is_open(port), timeout=START_TIMEOUT, what="TCP accept"
        )
        self.progress(f"broker ready after {seconds:.2f} s")

    def _create_enrollment_token(self, supervisor: Supervisor, database: Path) -> Path:
        argv = [
            *self.python,
            "verifier",
            "enrollment-token",
            "create",
            "--db",
            str(database),
            "--json",
        ]
        status, output = supervisor.run("enrollment-token", argv, env=self.env, timeout=60)
        if status != 0:
            raise DemoError(f"creating an enrollment token failed (status {status}):\n{output}")
        token = json.loads(output.strip().splitlines()[-1])["tokens"][0]
        path = self.directory / "enrollment.token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        self.progress("created a one-time enrollment token")
        return path

    def _provision(
        self,
        supervisor: Supervisor,
        key_uri: str,
        verifier_url: str,
        token_file: Path,
        ca_path: Path,
        broker_url: str,
    ) -> Path:
        config_path = self.directory / "device.toml"
        argv = [
            *self.python,
            "provision",
            "--key",
            key_uri,
            "--verifier",
            verifier_url,
            "--enrollment-token-file",
            str(token_file),
            "--config",
            str(config_path),
            "--ca-bundle",
            str(ca_path),
            "--broker",
            broker_url,
            "--allow-software-key",
            "--json",
        ]
        status, output = supervisor.run(
            "provision",
            argv,
            env=self.env,
            timeout=PROVISION_TIMEOUT,
            on_start=lambda child: self.progress(f"running device-sdk provision (PID {child.pid})"),
        )
        if status != 0:
            raise DemoError(f"device-sdk provision failed (status {status}):\n{output}")
        self.progress(f"provisioned the device; config in {config_path}")
        return config_path

    def _log_in(self, config_path: Path) -> None:
        from device_sdk.config import load_config
        from device_sdk.keys import open_key

        report = self.report
        config = load_config(config_path)
        key = open_key(config.key_uri)
        report.device_id = key.device_id
        report.backend = key.backend
        report.hardware_backed = key.hardware_backed
        verify = str(config.ca_bundle) if config.ca_bundle else True

        with _timed(report, "http_login"):
            report.http = self._http_login(key, config.verifier_url, verify)
        self.progress(f"HTTP login: {'ok' if report.http['success'] else 'FAILED'}")

        assert config.broker_url is not None
        with _timed(report, "mqtt_login_and_message"):
            report.mqtt = self._mqtt_round_trip(key, config.broker_url, config.verifier_url, verify)
        self.progress(f"MQTT login and message: {'ok' if report.mqtt['success'] else 'FAILED'}")

    def _http_login(self, key: Any, verifier_url: str, verify: bool | str) -> dict[str, Any]:
        import httpx

        from device_sdk.http import DeviceAuth

        auth = DeviceAuth(key, verifier_url)
        started = time.monotonic()
        try:
            with httpx.Client(verify=verify, timeout=10.0) as client:
                response = client.get(verifier_url + "/v1/whoami", auth=auth)
        except (DeviceSDKError, httpx.HTTPError) as exc:
            return {"success": False, "error": str(exc)}
        seconds = time.monotonic() - started
        body = response.json() if response.status_code == 200 else {}
        return {
            "success": response.status_code == 200 and body.get("device_id") == auth.device_id,
            "status": response.status_code,
            "login_ms": round(seconds * 1000, 1),
            "whoami": body.get("device_id"),
        }

    def _mqtt_round_trip(
        self, key: Any, broker_url: str, verifier_url: str, verify: bool | str
    ) -> dict[str, Any]:
        from device_sdk.mqtt.client import DeviceMqttClient

        client = DeviceMqttClient(
            key, broker_url, verifier_url=verifier_url, verify=verify, connect_timeout=10.0
        )
        topic = f"devices/{client.device_id}/demo"
        payload = f"hello from {client.device_id} {secrets.token_hex(4)}".encode()
        received: list[bytes] = []
        subscribed: list[bool] = []
        client.paho.on_message = lambda _c, _u, message: received.append(bytes(message.payload))
        client.paho.on_subscribe = lambda *_args: subscribed.append(True)

        started = time.monotonic()
        try:
            client.connect_once()
        except DeviceSDKError as exc:
            return {"success": False, "error": str(exc)}
        login_seconds = time.monotonic() - started

        try:
            client.paho.subscribe(topic, qos=1)
            self._loop_until(client, lambda: bool(subscribed), "SUBACK")
            sent = time.monotonic()
            client.paho.publish(topic, payload, qos=1)
            self._loop_until(client, lambda: payload in received, "the published message")
            round_trip = time.monotonic() - sent
        except DemoError as exc:
            return {"success": False, "login_ms": round(login_seconds * 1000, 1), "error": str(exc)}
        finally:
            client.disconnect()

        return {
            "success": True,
            "login_ms": round(login_seconds * 1000, 1),
            "topic": topic,
            "message_round_trip_ms": round(round_trip * 1000, 1),
        }

    @staticmethod
    def _loop_until(client: Any, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + MESSAGE_TIMEOUT
        while not condition():
            if time.monotonic() > deadline:
                raise DemoError(f"no {what} from the broker within {MESSAGE_TIMEOUT:.0f} s")
            client.paho.loop(0.05)


def run(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        print(f"demo: {message}", file=sys.stderr, flush=True)

    directory = Path(tempfile.mkdtemp(prefix="device-sdk-demo-"))
    demo = Demo(directory, progress)
    started = time.monotonic()
    try:
        with Supervisor(directory) as supervisor:
            try:
                demo.run(supervisor)
            except DeviceSDKError as exc:
                demo.report.error = str(exc)
            except Exception as exc:  # noqa: BLE001 - the report must still be printed
                demo.report.error = f"{type(exc).__name__}: {exc}"
            progress("stopping the verifier and the broker")
            shutdown_started = time.monotonic()
        demo.report.timings["shutdown"] = time.monotonic() - shutdown_started
    finally:
        if args.keep:
            progress(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
            demo.report.directory = None
    demo.report.timings["total"] = time.monotonic() - started

    if args.json:
        json.dump(demo.report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_text(demo.report)
    return 0 if demo.report.ok else 1


def _print_text(report: DemoReport) -> None:
    data = report.to_dict()
    print("device-sdk demo")
    print(f"  device:     {report.device_id}")
    print(f"  key:        {report.backend}, hardware_backed={report.hardware_backed}")
    print(f"  verifier:   {report.verifier_url}")
    print(f"  broker:     {report.broker_url}")
    print(
        f"  HTTP login: {'ok' if report.http.get('success') else 'FAILED'}"
        f" ({report.http.get('login_ms', '-')} ms)"
    )
    print(
        f"  MQTT login: {'ok' if report.mqtt.get('success') else 'FAILED'}"
        f" ({report.mqtt.get('login_ms', '-')} ms), message round trip "
        f"{report.mqtt.get('message_round_trip_ms', '-')} ms"
    )
    print("  timings (ms):")
    for name, value in data["timings_ms"].items():
        print(f"    {name:<24}{value:>9.1f}")
    if report.error:
        print(f"  error: {report.error}")
    print("result: " + ("success" if report.ok else "FAILED"))
