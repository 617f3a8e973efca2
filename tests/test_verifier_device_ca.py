"""The verifier as device CA: client certificates issued at enrollment, stored per device."""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi.testclient import TestClient
from fixtures_verifier import REGISTRY_KINDS, make_csr, make_key, verifier_config

from device_sdk.auth import device_id_of
from device_sdk.cli.main import build_parser
from device_sdk.cli.verifier import build_config
from device_sdk.errors import ConfigError, VerificationError
from device_sdk.verifier import Verifier
from device_sdk.verifier.app import create_app
from device_sdk.verifier.device_ca import BACKDATE_SECONDS, DeviceCA

LIFETIME = 30 * 24 * 3600


def write_ca(directory: Path, *, ca: bool = True, key_mode: int = 0o600) -> tuple[Path, Path]:
    """Write a self-signed P-256 CA certificate and its key; return both paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-sdk test device CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "device-ca.pem"
    key_path = directory / "device-ca.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, key_mode)
    with os.fdopen(descriptor, "wb") as file:
        file.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.chmod(key_path, key_mode)
    return cert_path, key_path


@pytest.fixture
def ca_files(tmp_path: Path) -> tuple[Path, Path]:
    return write_ca(tmp_path)


@pytest.fixture(params=REGISTRY_KINDS)
def registry_kind(request: pytest.FixtureRequest) -> str:
    """Run the tests that open a verifier through ``open_verifier`` on SQLite and PostgreSQL."""
    kind: str = request.param
    return kind


@pytest.fixture
def ca_verifier(
    open_verifier: Callable[..., Verifier], ca_files: tuple[Path, Path]
) -> Iterator[Verifier]:
    config = verifier_config(device_certificate_lifetime=LIFETIME)
    verifier = open_verifier(config, device_ca_cert=ca_files[0], device_ca_key=ca_files[1])
    yield verifier
    verifier.close()


def test_enroll_issues_client_certificate(
    ca_verifier: Verifier, ca_files: tuple[Path, Path]
) -> None:
    key = make_key("ES256")
    token = ca_verifier.create_enrollment_tokens()[0]

    enrollment = ca_verifier.enroll_device(make_csr(key), token, "pkcs11", True)

    assert enrollment.created is True
    assert enrollment.certificate_pem is not None
    certificate = x509.load_pem_x509_certificate(enrollment.certificate_pem.encode("ascii"))
    ca_certificate = x509.load_pem_x509_certificate(ca_files[0].read_bytes())
    device_id = device_id_of(key)
    certificate.verify_directly_issued_by(ca_certificate)
    assert certificate.subject.rfc4514_string() == f"CN={device_id}"
    assert certificate.public_key() == key.public_key()
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"urn:device-sdk:device:{device_id}"
    ]
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical is True
    assert constraints.value.ca is False
    validity = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert validity == datetime.timedelta(seconds=LIFETIME + BACKDATE_SECONDS)


def test_enroll_again_returns_same_certificate(ca_verifier: Verifier) -> None:
    key = make_key("ES256")
    token = ca_verifier.create_enrollment_tokens()[0]
    first = ca_verifier.enroll_device(make_csr(key), token, "pkcs11", True)

    again = ca_verifier.enroll_device(make_csr(key), token, "pkcs11", True)

    assert again.created is False
    assert again.certificate_pem == first.certificate_pem
    assert ca_verifier.registry.device_certificate(device_id_of(key)) == first.certificate_pem


def test_enroll_without_ca_issues_none(tmp_path: Path) -> None:
    verifier = Verifier.open(tmp_path / "verifier.db", verifier_config())
    try:
        token = verifier.create_enrollment_tokens()[0]
        enrollment = verifier.enroll_device(make_csr(make_key("ES256")), token, "pkcs11", True)
    finally:
        verifier.close()

    assert enrollment.certificate_pem is None


def test_rejected_enrollment_gets_no_certificate(ca_verifier: Verifier) -> None:
    token = ca_verifier.create_enrollment_tokens()[0]
    ca_verifier.enroll_device(make_csr(make_key("ES256")), token, "pkcs11", True)
    intruder = make_key("ES256")

    with pytest.raises(VerificationError) as caught:
        ca_verifier.enroll_device(make_csr(intruder), token, "pkcs11", True)

    assert caught.value.reason == "enrollment_token_used"
    assert ca_verifier.registry.device_certificate(device_id_of(intruder)) is None


def test_enroll_endpoint_returns_certificate(ca_verifier: Verifier) -> None:
    key = make_key("ES256")
    token = ca_verifier.create_enrollment_tokens()[0]
    body = {
        "csr": make_csr(key).decode("ascii"),
        "enrollment_token": token,
        "backend": "pkcs11",
        "hardware_backed": True,
    }

    with TestClient(create_app(ca_verifier)) as client:
        first = client.post("/v1/enroll", json=body)
        again = client.post("/v1/enroll", json=body)

    assert first.status_code == 201
    assert again.status_code == 200
    certificate = first.json()["certificate"]
    assert certificate.startswith("-----BEGIN CERTIFICATE-----\n")
    assert again.json()["certificate"] == certificate
    assert first.json()["device"]["attested"] is False


def test_ca_key_readable_by_others_rejected(tmp_path: Path) -> None:
    cert_path, key_path = write_ca(tmp_path, key_mode=0o644)

    with pytest.raises(ConfigError, match=f"chmod 600 {key_path}"):
        DeviceCA.from_pem_files(cert_path, key_path)


def test_ca_certificate_without_ca_flag_rejected(tmp_path: Path) -> None:
    cert_path, key_path = write_ca(tmp_path, ca=False)

    with pytest.raises(ConfigError, match="is not a CA certificate"):
        DeviceCA.from_pem_files(cert_path, key_path)


def test_ca_key_of_other_certificate_rejected(tmp_path: Path) -> None:
    cert_path, _ = write_ca(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = write_ca(other)

    with pytest.raises(ConfigError, match="does not belong to the device CA certificate"):
        DeviceCA.from_pem_files(cert_path, other_key)


def test_open_needs_both_ca_files(tmp_path: Path, ca_files: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="both its certificate and its key"):
        Verifier.open(tmp_path / "v.db", verifier_config(), device_ca_cert=ca_files[0])



# `device-sdk verifier serve` options


def serve_args(*options: str) -> argparse.Namespace:
    return build_parser().parse_args(["verifier", "serve", "--db", "v.db", *options])


def test_serve_options_set_attestation_and_lifetime(tmp_path: Path) -> None:
    root_cert, _ = write_ca(tmp_path)

    config = build_config(
        serve_args("--ek-ca", str(root_cert), "--require-attestation", "--device-cert-days", "30")
    )

    assert [root.subject for root in config.ek_roots] == [
        x509.load_pem_x509_certificate(root_cert.read_bytes()).subject
    ]
    assert config.ek_intermediates == ()
    assert config.require_attestation is True
    assert config.device_certificate_lifetime == 30 * 24 * 3600


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--require-attestation",), "--require-attestation needs --ek-ca"),
        (("--device-ca-cert", "ca.pem"), "--device-ca-cert and --device-ca-key go together"),
        (("--device-cert-days", "0"), "--device-cert-days must be at least 1, got 0"),
    ],
)
def test_serve_options_rejected(options: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(serve_args(*options))


def test_ek_ca_without_root_rejected(tmp_path: Path) -> None:
    ca_cert, ca_key = write_ca(tmp_path)
    leaf_dir = tmp_path / "leaf"
    leaf_dir.mkdir()
    leaf = DeviceCA.from_pem_files(ca_cert, ca_key).issue(
        x509.load_pem_x509_csr(make_csr(make_key("ES256"))), "leaf", 1_800_000_000
    )
    (leaf_dir / "leaf.pem").write_text(leaf)

    with pytest.raises(ConfigError, match="contain no self-signed root CA certificate"):
        build_config(serve_args("--ek-ca", str(leaf_dir / "leaf.pem")))


def test_revoked_device_gets_no_certificate_with_its_spent_token(
    open_verifier: Callable[..., Verifier], ca_files: tuple[Path, Path]
) -> None:
    # Enrolled before the verifier became a device CA, then revoked: re-running provisioning
    # with the spent token must not hand the revoked key a client certificate for the broker.
    key = make_key("ES256")
    plain = open_verifier(verifier_config())
    token = plain.create_enrollment_tokens()[0]
    plain.enroll_device(make_csr(key), token, "pkcs11", True)
    plain.revoke(device_id_of(key))
    plain.close()
    with_ca = open_verifier(
        verifier_config(), device_ca_cert=ca_files[0], device_ca_key=ca_files[1]
    )
    try:
        with pytest.raises(VerificationError) as caught:
            with_ca.enroll_device(make_csr(key), token, "pkcs11", True)
        issued = with_ca.registry.device_certificate(device_id_of(key))
    finally:
        with_ca.close()

    assert caught.value.reason == "revoked_device"
    assert issued is None


def test_expired_ca_certificate_is_config_error(tmp_path: Path) -> None:
    # An expired CA cannot issue a certificate: without this check the first enrollment
    # failed with a ValueError (a 500) after the device record was already stored.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired device CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=10))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )

    with pytest.raises(ConfigError, match="expired on"):
        DeviceCA(certificate, key)
