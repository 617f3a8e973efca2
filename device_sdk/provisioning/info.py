"""The report of ``device-sdk info`` on a provisioned device, gathered without printing."""

from __future__ import annotations

import datetime
import logging
import socket
import ssl
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509

from device_sdk.config import DeviceConfig, export_softhsm2_conf, load_config
from device_sdk.errors import DeviceSDKError
from device_sdk.provisioning.verifier_client import HEALTH_PATH

logger = logging.getLogger(__name__)

TIMEOUT = 5.0
MQTT_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}


@dataclass
class Reachability:
    """The result of a reachability check: whether the server responded, how fast, and the error."""

    url: str
    reachable: bool
    seconds: float | None = None
    detail: str = ""


@dataclass
class CertificateInfo:
    """The location, subject and expiry of the device certificate."""

    location: str | None
    not_after: str | None = None
    days_left: float | None = None
    subject: str | None = None
    error: str | None = None


@dataclass
class DeviceInfo:
    """The report of ``device-sdk info``."""

    config: str
    device_id: str
    backend: str
    hardware_backed: bool
    algorithm: str
    key_uri: str
    certificate: CertificateInfo
    verifier: Reachability
    broker: Reachability | None
    software_key_allowed: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def _ssl_context(config: DeviceConfig) -> ssl.SSLContext:
    if config.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(config.ca_bundle))
    return ssl.create_default_context()


def check_verifier(config: DeviceConfig) -> Reachability:
    """GET the verifier's health endpoint; any HTTP response counts as reachable."""
    url = config.verifier_url.rstrip("/") + HEALTH_PATH
    started = time.monotonic()
    try:
        with httpx.Client(verify=_ssl_context(config), timeout=TIMEOUT) as client:
            response = client.get(url)
    except httpx.HTTPError as exc:
        return Reachability(url, False, detail=f"{type(exc).__name__}: {exc}")
    return Reachability(url, True, time.monotonic() - started, f"HTTP {response.status_code}")


def check_broker(config: DeviceConfig) -> Reachability | None:
    """Open a TCP connection to the broker (and a TLS handshake for mqtts:); None if no broker."""
    if config.broker_url is None:
        return None
    parts = urlsplit(config.broker_url)
    host = parts.hostname or ""
    port = parts.port or MQTT_DEFAULT_PORTS.get(parts.scheme, 1883)
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            if parts.scheme in ("mqtts", "wss"):
                with _ssl_context(config).wrap_socket(sock, server_hostname=host):
                    pass
    except (OSError, ssl.SSLError) as exc:
        return Reachability(config.broker_url, False, detail=f"{type(exc).__name__}: {exc}")
    detail = "TLS handshake completed" if parts.scheme in ("mqtts", "wss") else "TCP connected"
    return Reachability(config.broker_url, True, time.monotonic() - started, detail)


def _describe(certificate: x509.Certificate, location: str) -> CertificateInfo:
    not_after = certificate.not_valid_after_utc
    left = not_after - datetime.datetime.now(datetime.UTC)
    return CertificateInfo(
        location=location,
        not_after=not_after.isoformat(),
        days_left=round(left.total_seconds() / 86400, 2),
        subject=certificate.subject.rfc4514_string(),
    )


def read_certificate(config: DeviceConfig) -> CertificateInfo:
    """Find the device certificate: the config's file, else on the PKCS#11 token."""
    if config.certificate_path is not None:
        path = Path(config.certificate_path)
        try:
            certificate = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            return CertificateInfo(location=str(path), error=f"cannot read certificate: {exc}")
        return _describe(certificate, str(path))

    if config.key_uri.startswith("pkcs11:"):
        from device_sdk.keys import pkcs11

        try:
            found = pkcs11.find_certificate(config.key_uri)
        except DeviceSDKError as exc:
            return CertificateInfo(location=None, error=f"cannot read the token: {exc}")
        if found is not None:
            return _describe(found, "token")
    return CertificateInfo(location=None)


def device_info(config_path: Path) -> DeviceInfo:
    """Gather the report for the device config at ``config_path``.

    Raises ConfigError for a missing or invalid config; unreachable servers and an unreadable
    certificate are reported in ``problems`` instead.
    """
    config = load_config(config_path)
    # The certificate may be on a SoftHSM token, found only through SOFTHSM2_CONF.
    export_softhsm2_conf(config)
    certificate = read_certificate(config)
    verifier = check_verifier(config)
    broker = check_broker(config)

    info = DeviceInfo(
        config=str(config_path),
        device_id=config.device_id,
        backend=config.backend,
        hardware_backed=config.hardware_backed,
        algorithm=config.algorithm,
        key_uri=config.key_uri,
        certificate=certificate,
        verifier=verifier,
        broker=broker,
        software_key_allowed=config.software_key_allowed,
    )
    if not verifier.reachable:
        info.problems.append(f"verifier {verifier.url} is unreachable: {verifier.detail}")
    if broker is not None and not broker.reachable:
        info.problems.append(f"broker {broker.url} is unreachable: {broker.detail}")
    if certificate.error:
        info.problems.append(certificate.error)
    elif certificate.days_left is not None and certificate.days_left < 0:
        info.problems.append(f"the device certificate expired on {certificate.not_after}")
    return info
