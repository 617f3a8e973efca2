"""``device-sdk demo``: the whole device login, end to end, on one machine with no configuration.

The demo makes a temporary directory with a throwaway CA and a SoftHSM token. It starts the
verifier (SQLite, HTTPS) and the embedded amqtt broker (TLS, with the verifier plugin) on free
loopback ports, and provisions one device by running ``device-sdk provision`` as a child process.
Then it logs in over HTTP and MQTT, publishes a message, receives it back, and prints a report
with timings. Every child runs under :class:`~device_sdk.cli.processes.Supervisor`, so
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
import ssl
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

from device_sdk.cli.processes import Child, Supervisor, free_loopback_port, port_is_open
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
    """The demo report: login results, the key's provenance, and each step's time in seconds."""

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


@dataclass(frozen=True)
class DemoPKI:
    """Files of the throwaway PKI: a CA and one server certificate each for verifier and broker."""

    ca: Path
    verifier_cert: Path
    verifier_key: Path
    broker_cert: Path
    broker_key: Path


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def _server_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, common_name: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
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
    return certificate, key


def _write_pki(directory: Path) -> DemoPKI:
    """Write a CA valid for one day and server certificates for 127.0.0.1 signed by it."""
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
    pki = DemoPKI(
        ca=directory / "ca.pem",
        verifier_cert=directory / "verifier.pem",
        verifier_key=directory / "verifier.key",
        broker_cert=directory / "broker.pem",
        broker_key=directory / "broker.key",
    )
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, cert_path, key_path in (
        ("device-sdk demo verifier", pki.verifier_cert, pki.verifier_key),
        ("device-sdk demo broker", pki.broker_cert, pki.broker_key),
    ):
        certificate, key = _server_certificate(ca_key, ca_name, name)
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_private_key(key_path, key)
    return pki


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
        self.database = directory / "verifier.sqlite"
        self.pki: DemoPKI
        self.verifier_port = self.broker_port = 0
        self.verifier_url = self.broker_url = ""

    def run(self, supervisor: Supervisor) -> None:
        report = self.report
        with _timed(report, "pki_and_token"):
            self.pki = _write_pki(self.directory)
            key_uri = self._create_token()
        supervisor.check_interrupted()

        self.verifier_port, self.broker_port = free_loopback_port(), free_loopback_port()
        self.verifier_url = f"https://{HOST}:{self.verifier_port}"
        self.broker_url = f"mqtts://{HOST}:{self.broker_port}"
        report.verifier_url, report.broker_url = self.verifier_url, self.broker_url

        with _timed(report, "verifier_start"):
            self._start_verifier(supervisor)
        with _timed(report, "broker_start"):
            self._start_broker(supervisor)
        with _timed(report, "enrollment_token"):
            token_file = self._create_enrollment_token(supervisor)
        with _timed(report, "provision"):
            config_path = self._provision(supervisor, key_uri, token_file)

        supervisor.check_interrupted()
        self._log_in(config_path)
        supervisor.check_interrupted()
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

    def _start_verifier(self, supervisor: Supervisor) -> None:
        import httpx

        argv = [*self.python, "verifier", "serve", "--db", str(self.database)]
        argv += ["--port", str(self.verifier_port), "--log-level", "warning"]
        argv += ["--tls-cert", str(self.pki.verifier_cert), "--tls-key", str(self.pki.verifier_key)]
        argv += ["--broker-audience", self.broker_url]
        argv += ["--broker-cert", self.broker_url, str(self.pki.broker_cert)]
        child = supervisor.start("verifier", argv, env=self.env)
        self.progress(f"started verifier (PID {child.pid}) on {self.verifier_url}")

        def ready() -> bool:
            try:
                response = httpx.get(
                    self.verifier_url + "/healthz", verify=str(self.pki.ca), timeout=1.0
                )
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        seconds = supervisor.wait_until(child, ready, timeout=START_TIMEOUT, what="HTTPS /healthz")
        self.progress(f"verifier ready after {seconds:.2f} s")

    def _start_broker(self, supervisor: Supervisor) -> None:
        argv = [sys.executable, "-m", "device_sdk.cli.demo_broker", "--db", str(self.database)]
        argv += ["--issuer", self.verifier_url, "--issuer-cert", str(self.pki.verifier_cert)]
        argv += ["--port", str(self.broker_port), "--audience", self.broker_url]
        argv += ["--tls-cert", str(self.pki.broker_cert), "--tls-key", str(self.pki.broker_key)]
        child = supervisor.start("broker", argv, env=self.env)
        self.progress(f"started MQTT broker (PID {child.pid}) on {self.broker_url}")

        seconds = supervisor.wait_until(
            child,
            lambda: port_is_open(self.broker_port),
            timeout=START_TIMEOUT,
            what="TCP accept",
        )
        self.progress(f"broker ready after {seconds:.2f} s")

    def _create_enrollment_token(self, supervisor: Supervisor) -> Path:
        argv = [*self.python, "verifier", "enrollment-token", "create"]
        argv += ["--db", str(self.database), "--json"]
        status, output = supervisor.run("enrollment-token", argv, env=self.env, timeout=60)
        if status != 0:
            raise DemoError(f"creating an enrollment token failed (status {status}):\n{output}")
        # The log holds stderr too, so take the JSON object line rather than the last line.
        answers = [line for line in output.splitlines() if line.startswith("{")]
        if not answers:
            raise DemoError(
                f"`device-sdk verifier enrollment-token create` printed no JSON:\n{output}"
            )
        token = json.loads(answers[-1])["tokens"][0]

        path = self.directory / "enrollment.token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        self.progress("created a one-time enrollment token")
        return path

    def _provision(self, supervisor: Supervisor, key_uri: str, token_file: Path) -> Path:
        config_path = self.directory / "device.toml"
        argv = [*self.python, "provision", "--key", key_uri, "--verifier", self.verifier_url]
        argv += ["--enrollment-token-file", str(token_file), "--config", str(config_path)]
        argv += ["--ca-bundle", str(self.pki.ca), "--broker", self.broker_url]
        argv += ["--allow-software-key", "--json"]

        def announce(child: Child) -> None:
            self.progress(f"running device-sdk provision (PID {child.pid})")

        status, output = supervisor.run(
            "provision", argv, env=self.env, timeout=PROVISION_TIMEOUT, on_start=announce
        )
        if status != 0:
            raise DemoError(f"device-sdk provision failed (status {status}):\n{output}")
        self.progress(f"provisioned the device; config in {config_path}")
        return config_path

    def _log_in(self, config_path: Path) -> None:
        from device_sdk.config import export_softhsm2_conf, load_config
        from device_sdk.keys import open_key

        report = self.report
        config = load_config(config_path)
        export_softhsm2_conf(config)
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

        tls_context = None
        if broker_url.startswith("mqtts:"):
            cafile = verify if isinstance(verify, str) else None
            tls_context = ssl.create_default_context(cafile=cafile)
        client = DeviceMqttClient(
            key,
            broker_url,
            verifier_url=verifier_url,
            verify=verify,
            tls_context=tls_context,
            connect_timeout=10.0,
        )
        topic = f"devices/{client.device_id}/demo"
        payload = f"hello from {client.device_id} {secrets.token_hex(4)}".encode()
        received: list[bytes] = []
        subscribed: list[bool] = []
        client.paho.on_message = lambda _c, _u, message: received.append(bytes(message.payload))
        client.paho.on_subscribe = lambda *_args: subscribed.append(True)

        started = time.monotonic()
        try:
            attempt = client.connect_once()
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
            "channel_bound": attempt.cb is not None,
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
