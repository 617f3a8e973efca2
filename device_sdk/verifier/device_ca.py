"""The device CA: X.509 client certificates for enrolled keys, for MQTT over mutual TLS.

A broker that trusts this CA (Mosquitto's ``cafile`` with ``require_certificate true`` and
``use_identity_as_username true``) takes the certificate's CN, the device id, as the MQTT
username. The certificate names only what the verifier checked: the key, its device id and the
device URN. Any other subject or extension in the CSR is ignored.
"""

from __future__ import annotations

import datetime
import logging
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_sdk.errors import ConfigError

__all__ = ["DEFAULT_CERTIFICATE_LIFETIME", "DEVICE_URN_PREFIX", "DeviceCA", "device_urn"]

logger = logging.getLogger(__name__)

DEFAULT_CERTIFICATE_LIFETIME = 365 * 24 * 3600
"""Seconds a device certificate is valid: 365 days."""

# The same prefix as device_sdk.provisioning.csr, which puts this URN in every CSR.
DEVICE_URN_PREFIX = "urn:device-sdk:device:"

# Devices without an RTC may run a few minutes behind: certificates start this early.
BACKDATE_SECONDS = 300

CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def device_urn(device_id: str) -> str:
    """Return the URI that names a device in its certificate's subjectAltName."""
    return DEVICE_URN_PREFIX + device_id


class DeviceCA:
    """Issues client certificates for device keys; ``lifetime`` is in seconds."""

    def __init__(
        self,
        certificate: x509.Certificate,
        private_key: CAKey,
        lifetime: int = DEFAULT_CERTIFICATE_LIFETIME,
    ) -> None:
        if lifetime < 60:
            raise ConfigError(f"device certificate lifetime {lifetime} s is below 60 s")
        if certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ConfigError("the device CA key does not belong to the device CA certificate")
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.value.ca:
            raise ConfigError(
                f"device CA certificate {certificate.subject.rfc4514_string()!r} is not a CA "
                "certificate (basicConstraints CA:TRUE is missing)"
            )
        expires = certificate.not_valid_after_utc
        if expires <= datetime.datetime.now(datetime.UTC):
            raise ConfigError(
                f"device CA certificate {certificate.subject.rfc4514_string()!r} expired on "
                f"{expires.isoformat()}; issue a new CA certificate"
            )
        self.certificate = certificate
        self.private_key = private_key
        self.lifetime = lifetime

    @classmethod
    def from_pem_files(
        cls,
        certificate_path: str | Path,
        key_path: str | Path,
        lifetime: int = DEFAULT_CERTIFICATE_LIFETIME,
    ) -> DeviceCA:
        """Load the CA certificate and its unencrypted PEM private key (mode 0600 or stricter)."""
        certificate_path = Path(certificate_path)
        key_path = Path(key_path)
        try:
            certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read the device CA certificate from {certificate_path}: {exc}"
            ) from None

        try:
            mode = stat.S_IMODE(key_path.stat().st_mode)
            pem = key_path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the device CA key {key_path}: {exc}") from None
        if mode & 0o077:
            raise ConfigError(
                f"device CA key {key_path} has mode {mode:04o}; restrict it with "
                f"chmod 600 {key_path}"
            )
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise ConfigError(
                f"device CA key {key_path} is not an unencrypted PEM private key"
            ) from None
        if not isinstance(key, CAKey):
            raise ConfigError(f"device CA key {key_path} is not an EC, RSA or Ed25519 key")
        return cls(certificate, key, lifetime)

    def issue(self, csr: x509.CertificateSigningRequest, device_id: str, now: int) -> str:
        """Return a PEM client certificate for the CSR's key: CN and SAN URI name the device.

        The caller has checked the CSR's signature and that ``device_id`` is its key's id.
        Validity starts :data:`BACKDATE_SECONDS` before ``now`` and ends after the lifetime or
        with the CA certificate, whichever comes first.
        """
        start = datetime.datetime.fromtimestamp(now - BACKDATE_SECONDS, datetime.UTC)
        end = min(
            datetime.datetime.fromtimestamp(now + self.lifetime, datetime.UTC),
            self.certificate.not_valid_after_utc,
        )
        if end <= start:
            raise ConfigError(
                f"device CA certificate {self.certificate.subject.rfc4514_string()!r} expired on "
                f"{end.isoformat()}; issue a new CA certificate"
            )
        public_key = csr.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_urn(device_id))]),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.private_key.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
        )
        algorithm = None if isinstance(self.private_key, ed25519.Ed25519PrivateKey) else (
            hashes.SHA256()
        )
        certificate = builder.sign(self.private_key, algorithm)
        logger.info(
            "issued device certificate serial %x for %s, valid until %s",
            certificate.serial_number,
            device_id,
            end.isoformat(),
        )
        return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
