"""Provisioning against a verifier that is a device CA: the certificate is stored on the token."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from fixtures_login import MANAGEMENT_ISSUER, VerifierServer, serve_verifier
from fixtures_services import UvicornFactory
from test_verifier_device_ca import write_ca

from device_sdk.keys import pkcs11
from device_sdk.provisioning import ProvisioningRequest, provision
from device_sdk.verifier import Verifier, VerifierConfig


def serve_device_ca(factory: UvicornFactory, directory: Path) -> VerifierServer:
    ca_dir = directory / "device-ca"
    ca_dir.mkdir(parents=True)
    ca_cert, ca_key = write_ca(ca_dir)
    return serve_verifier(
        factory,
        directory / "verifier",
        extra_args=("--device-ca-cert", str(ca_cert), "--device-ca-key", str(ca_key)),
    )


def write_token_file(server: VerifierServer, path: Path) -> Path:
    verifier = Verifier.open(server.db_path, VerifierConfig(issuer=MANAGEMENT_ISSUER))
    try:
        (token,) = verifier.create_enrollment_tokens(1)
    finally:
        verifier.close()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    return path


def test_provision_stores_issued_certificate_on_token(
    uvicorn_factory: UvicornFactory, softhsm_key_uri: str, tmp_path: Path
) -> None:
    server = serve_device_ca(uvicorn_factory, tmp_path)
    request = ProvisioningRequest(
        key_uri=softhsm_key_uri,
        config_path=tmp_path / "device.toml",
        verifier_url=server.url,
        enrollment_token_file=write_token_file(server, tmp_path / "token"),
        allow_software_key=True,
    )

    result = provision(request)

    assert result.certificate_location is not None
    assert result.certificate_location.startswith("token (")
    assert not (tmp_path / "device.cert.pem").exists()
    on_token = pkcs11.find_certificate(softhsm_key_uri)
    assert on_token is not None
    verifier = Verifier.open(server.db_path, VerifierConfig(issuer=MANAGEMENT_ISSUER))
    try:
        issued = verifier.registry.device_certificate(result.device_id)
    finally:
        verifier.close()
    assert issued is not None
    assert on_token == x509.load_pem_x509_certificate(issued.encode("ascii"))
    assert on_token.subject.rfc4514_string() == f"CN={result.device_id}"
