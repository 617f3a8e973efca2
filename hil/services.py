"""The rig's own servers: the verifier (HTTPS) and an MQTT broker whose logins it checks.

The rig makes a throwaway CA valid for one day, with server certificates for the address that
devices use (``services.advertise``), starts ``device-sdk verifier serve`` and the embedded amqtt
broker (``python -m device_sdk.cli.demo_broker``) on free ports, and stops both by PID. The
broker can be restarted on the same port, for the reconnect scenario.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_sdk.cli.processes import Child, Supervisor, free_loopback_port, port_is_open
from hil.inventory import Services

logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0
COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True)
class RigPKI:
    ca: Path
    verifier_cert: Path
    verifier_key: Path
    broker_cert: Path
    broker_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(address: str) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(address)))
    except ValueError:
        names.append(x509.DNSName(address))
    if address != "127.0.0.1":
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    return x509.SubjectAlternativeName(names)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def write_pki(directory: Path, address: str) -> RigPKI:
    """Write a one-day CA and server certificates for ``address`` (plus localhost) signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("device-sdk HIL rig CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pki = RigPKI(
        ca=directory / "ca.pem",
        verifier_cert=directory / "verifier.pem",
        verifier_key=directory / "verifier.key",
        broker_cert=directory / "broker.pem",
        broker_key=directory / "broker.key",
    )
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for common_name, cert_path, key_path in (
        ("device-sdk HIL verifier", pki.verifier_cert, pki.verifier_key),
        ("device-sdk HIL broker", pki.broker_cert, pki.broker_key),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(_san(address), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
    return pki


class RigServices:
    """The verifier and the broker of one rig run, under one :class:`Supervisor`."""

    def __init__(self, directory: Path, services: Services) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.services = services
        self.supervisor = Supervisor(directory)
        self.database = directory / "verifier.sqlite"
        self.pki = write_pki(directory, services.advertise)
        self.verifier_port = free_loopback_port()
        self.broker_port = free_loopback_port()
        host = services.advertise
        self.verifier_url = f"https://{host}:{self.verifier_port}"
        self.broker_url = f"mqtts://{host}:{self.broker_port}"
        self.verifier: Child | None = None
        self.broker: Child | None = None
        self.broker_restarts = 0
        self.python = [sys.executable, "-m", "device_sdk"]

    def start(self) -> None:
        self.start_verifier()
        self.start_broker()

    def start_verifier(self) -> None:
        import httpx

        context = ssl.create_default_context(cafile=str(self.pki.ca))
        argv = [*self.python, "verifier", "serve", "--db", str(self.database)]
        argv += ["--host", self.services.listen, "--port", str(self.verifier_port)]
        argv += ["--tls-cert", str(self.pki.verifier_cert), "--tls-key", str(self.pki.verifier_key)]
        argv += ["--issuer", self.verifier_url, "--broker-audience", self.broker_url]
        argv += ["--broker-cert", self.broker_url, str(self.pki.broker_cert)]
        argv += ["--no-rate-limits", "--log-level", "warning"]
        self.verifier = self.supervisor.start("verifier", argv)

        def ready() -> bool:
            try:
                response = httpx.get(
                    f"https://127.0.0.1:{self.verifier_port}/healthz",
                    verify=context,
                    timeout=1.0,
                )
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        seconds = self.supervisor.wait_until(
            self.verifier, ready, timeout=START_TIMEOUT, what="HTTPS /healthz"
        )
        logger.info(
            "verifier (PID %d) ready at %s after %.2f s",
            self.verifier.pid,
            self.verifier_url,
            seconds,
        )

    def start_broker(self) -> None:
        # NOTE: the demo broker binds 127.0.0.1 only, so boards on the bench LAN cannot reach
        # it yet. A bench with SSH devices needs a broker option for the listen address.
        argv = [sys.executable, "-m", "device_sdk.cli.demo_broker", "--db", str(self.database)]
        argv += ["--issuer", self.verifier_url, "--issuer-cert", str(self.pki.verifier_cert)]
        argv += ["--port", str(self.broker_port), "--audience", self.broker_url]
        argv += ["--tls-cert", str(self.pki.broker_cert), "--tls-key", str(self.pki.broker_key)]
        self.broker = self.supervisor.start(f"broker-{self.broker_restarts}", argv)
        self.supervisor.wait_until(
            self.broker,
            lambda: port_is_open(self.broker_port),
            timeout=START_TIMEOUT,
            what="TCP accept",
        )
        logger.info("broker (PID %d) ready at %s", self.broker.pid, self.broker_url)

    def stop_broker(self) -> None:
        if self.broker is not None:
            self.supervisor.stop(self.broker)
            self.broker = None

    def restart_broker(self) -> None:
        """Stop the broker and start it again on the same port, as a broker upgrade would."""
        self.stop_broker()
        self.broker_restarts += 1
        self.start_broker()

    def stop(self) -> None:
        self.supervisor.stop_all()

    def _management(self, *args: str) -> str:
        argv = [*self.python, "verifier", *args, "--db", str(self.database), "--json"]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"`device-sdk verifier {' '.join(args)}` failed with status {result.returncode}: "
                f"{result.stderr.strip()[-1000:]}"
            )
        return result.stdout

    def create_enrollment_token(self) -> str:
        output = self._management("enrollment-token", "create")
        token: str = json.loads(output.strip().splitlines()[-1])["tokens"][0]
        return token

    def registry(self) -> list[dict[str, object]]:
        """Return every device record in the verifier's registry."""
        records: list[dict[str, object]] = json.loads(self._management("devices", "list"))
        return records
