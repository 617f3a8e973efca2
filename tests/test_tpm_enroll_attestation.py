"""TPM attestation inside enrollment, and device certificates, on swtpm with EK certificates.

The EK certificates come from a local CA made by swtpm_setup (``swtpm_with_ek``). In-process
tests drive :class:`Verifier` directly; the provisioning tests run ``device-sdk verifier serve``
with ``--ek-ca``, ``--require-attestation`` and a device CA.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from fixtures_login import MANAGEMENT_ISSUER, VerifierServer, serve_verifier
from fixtures_services import UvicornFactory
from fixtures_tpm import EndorsementCA, Swtpm, require_tpm_stack
from fixtures_verifier import ManualClock, make_csr, make_key, verifier_config
from test_verifier_device_ca import write_ca

from device_sdk.auth.encoding import b64url_decode, b64url_encode
from device_sdk.errors import ProvisioningError, VerificationError
from device_sdk.provisioning import ProvisioningRequest, provision
from device_sdk.provisioning.csr import build_csr
from device_sdk.provisioning.run import certificate_path_for
from device_sdk.verifier import MemoryChallengeStore, SQLiteDeviceRegistry, Verifier, VerifierConfig
from device_sdk.verifier.app import create_app
from device_sdk.verifier.config import ek_certificates_from_pem

try:
    from device_sdk.keys import tpm, tpm_attestation
except ImportError:
    # The autouse fixture below skips every test, with the install command as the reason.
    pass


@pytest.fixture(autouse=True)
def _tpm_stack() -> None:
    require_tpm_stack()


@pytest.fixture
def simulator(swtpm_with_ek: tuple[Swtpm, EndorsementCA]) -> Swtpm:
    return swtpm_with_ek[0]


@pytest.fixture
def ek_ca(swtpm_with_ek: tuple[Swtpm, EndorsementCA]) -> EndorsementCA:
    return swtpm_with_ek[1]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def verifier(tmp_path: Path, ek_ca: EndorsementCA, clock: ManualClock) -> Iterator[Verifier]:
    """An in-process verifier that trusts the swtpm EK CA and requires attestation."""
    roots, intermediates = ek_certificates_from_pem(ek_ca.root_path, ek_ca.issuer_path)
    config = verifier_config(
        ek_roots=roots, ek_intermediates=intermediates, require_attestation=True
    )
    instance = Verifier(
        config,
        registry=SQLiteDeviceRegistry(tmp_path / "registry.db"),
        challenges=MemoryChallengeStore(clock),
        clock=clock,
    )
    yield instance
    instance.close()


def reason_of(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(VerificationError) as caught:
        call(*args, **kwargs)
    return caught.value.reason


def start_and_answer(verifier: Verifier, key: Any, token: str) -> dict[str, str]:
    """Run round one against ``verifier``; return the TPM's response to its challenge."""
    request = tpm_attestation.attestation_request(key)
    challenge = verifier.start_attestation(token, request)
    return tpm_attestation.answer_challenge(key, challenge)


def tpm_csr(key: Any) -> str:
    return build_csr(key, key.device_id)


# In-process verifier


def test_attested_enrollment_recorded(
    verifier: Verifier, simulator: Swtpm, tmp_path: Path
) -> None:
    key = tpm.generate_key(simulator.path_uri(tmp_path / "k.pem"), "ec-p256")
    token = verifier.create_enrollment_tokens()[0]
    evidence = start_and_answer(verifier, key, token)

    enrollment = verifier.enroll_device(tpm_csr(key), token, "tpm", True, attestation=evidence)

    assert enrollment.created is True
    assert enrollment.record.attested is True
    stored = verifier.get_device(key.device_id)
    assert stored is not None
    assert stored.attested is True
    assert stored.backend == "tpm"


def test_forged_certify_info_rejected(
    verifier: Verifier, simulator: Swtpm, tmp_path: Path
) -> None:
    key = tpm.generate_key(simulator.path_uri(tmp_path / "k.pem"), "ec-p256")
    token = verifier.create_enrollment_tokens()[0]
    evidence = start_and_answer(verifier, key, token)
    # Only the TPM can sign with the AK, so a TPMS_ATTEST changed outside it (here the last byte
    # of the certified key's qualified name) no longer matches the signature.
    certify_info = bytearray(b64url_decode(evidence["certify_info"]))
    certify_info[-1] ^= 0x01
    forged = {**evidence, "certify_info": b64url_encode(bytes(certify_info))}

    reason = reason_of(
        verifier.enroll_device, tpm_csr(key), token, "tpm", True, attestation=forged
    )

    assert reason == "attestation_bad_signature"
    assert verifier.get_device(key.device_id) is None


def test_interleaved_attestations_both_pass(
    verifier: Verifier, simulator: Swtpm, tmp_path: Path, clock: ManualClock
) -> None:
    first_key = tpm.generate_key(simulator.path_uri(tmp_path / "a.pem"), "ec-p256")
    second_key = tpm.generate_key(simulator.path_uri(tmp_path / "b.pem"), "ec-p256")
    first_token, second_token = verifier.create_enrollment_tokens(2)
    first_evidence = start_and_answer(verifier, first_key, first_token)
    clock.advance(5)
    second_evidence = start_and_answer(verifier, second_key, second_token)

    first = verifier.enroll_device(
        tpm_csr(first_key), first_token, "tpm", True, attestation=first_evidence
    )
    second = verifier.enroll_device(
        tpm_csr(second_key), second_token, "tpm", True, attestation=second_evidence
    )

    assert first.record.attested is True
    assert second.record.attested is True


def test_evidence_used_once(verifier: Verifier, simulator: Swtpm, tmp_path: Path) -> None:
    key = tpm.generate_key(simulator.path_uri(tmp_path / "k.pem"), "ec-p256")
    token = verifier.create_enrollment_tokens()[0]
    evidence = start_and_answer(verifier, key, token)
    verifier.enroll_device(tpm_csr(key), token, "tpm", True, attestation=evidence)

    reason = reason_of(
        verifier.enroll_device, tpm_csr(key), token, "tpm", True, attestation=evidence
    )

    assert reason == "attestation_unknown"


def test_attestation_expires(
    verifier: Verifier, simulator: Swtpm, tmp_path: Path, clock: ManualClock
) -> None:
    key = tpm.generate_key(simulator.path_uri(tmp_path / "k.pem"), "ec-p256")
    token = verifier.create_enrollment_tokens()[0]
    evidence = start_and_answer(verifier, key, token)
    clock.advance(verifier.config.challenge_lifetime + 1)

    reason = reason_of(
        verifier.enroll_device, tpm_csr(key), token, "tpm", True, attestation=evidence
    )

    assert reason == "attestation_expired"


def test_evidence_for_other_key_rejected(
    verifier: Verifier, simulator: Swtpm, tmp_path: Path
) -> None:
    attested = tpm.generate_key(simulator.path_uri(tmp_path / "a.pem"), "ec-p256")
    other = tpm.generate_key(simulator.path_uri(tmp_path / "b.pem"), "ec-p256")
    token = verifier.create_enrollment_tokens()[0]
    evidence = start_and_answer(verifier, attested, token)

    reason = reason_of(
        verifier.enroll_device, tpm_csr(other), token, "tpm", True, attestation=evidence
    )

    assert reason == "attestation_wrong_key"


def test_attestation_bound_to_token(
    verifier: Verifier, simulator: Swtpm, tmp_path: Path
) -> None:
    key = tpm.generate_key(simulator.path_uri(tmp_path / "k.pem"), "ec-p256")
    first, second = verifier.create_enrollment_tokens(2)
    evidence = start_and_answer(verifier, key, first)

    reason = reason_of(
        verifier.enroll_device, tpm_csr(key), second, "tpm", True, attestation=evidence
    )

    assert reason == "attestation_unknown"


def test_start_with_spent_token_rejected(
    verifier: Verifier, simulator: Swtpm, tmp_path: Path
) -> None:
    key = tpm.generate_key(simulator.path_uri(tmp_path / "k.pem"), "ec-p256")
    token = verifier.create_enrollment_tokens()[0]
    other = tpm.generate_key(simulator.path_uri(tmp_path / "o.pem"), "ec-p256")
    verifier.enroll_device(
        tpm_csr(other), token, "tpm", True, attestation=start_and_answer(verifier, other, token)
    )

    reason = reason_of(verifier.start_attestation, token, tpm_attestation.attestation_request(key))

    assert reason == "enrollment_token_used"


def test_later_attestation_marks_record(
    ek_ca: EndorsementCA, simulator: Swtpm, tmp_path: Path, clock: ManualClock
) -> None:
    roots, intermediates = ek_certificates_from_pem(ek_ca.root_path, ek_ca.issuer_path)
    verifier = Verifier(
        verifier_config(ek_roots=roots, ek_intermediates=intermediates),
        registry=SQLiteDeviceRegistry(tmp_path / "registry.db"),
        challenges=MemoryChallengeStore(clock),
        clock=clock,
    )
    key = tpm.generate_key(simulator.path_uri(tmp_path / "k.pem"), "ec-p256")
    token = verifier.create_enrollment_tokens()[0]
    try:
        unattested = verifier.enroll_device(tpm_csr(key), token, "tpm", True)
        evidence = start_and_answer(verifier, key, token)
        attested = verifier.enroll_device(tpm_csr(key), token, "tpm", True, attestation=evidence)
        stored = verifier.get_device(key.device_id)
    finally:
        verifier.close()

    assert unattested.record.attested is False
    assert attested.created is False
    assert attested.record.attested is True
    assert stored is not None
    assert stored.attested is True
    assert stored.enrolled_at == unattested.record.enrolled_at


def test_unattested_software_key_rejected(verifier: Verifier) -> None:
    token = verifier.create_enrollment_tokens()[0]

    reason = reason_of(verifier.enroll_device, make_csr(make_key("ES256")), token, "pkcs11", True)

    assert reason == "attestation_required"


def test_attestation_endpoint_without_ek_roots_404(tmp_path: Path, clock: ManualClock) -> None:
    verifier = Verifier(
        verifier_config(),
        registry=SQLiteDeviceRegistry(tmp_path / "registry.db"),
        challenges=MemoryChallengeStore(clock),
        clock=clock,
    )
    try:
        with TestClient(create_app(verifier)) as client:
            response = client.post("/v1/enroll/attestation", json={"enrollment_token": "x"})
    finally:
        verifier.close()

    assert response.status_code == 404


def test_attestation_endpoint_rejects_untrusted_ek(
    verifier: Verifier, simulator: Swtpm, tmp_path: Path
) -> None:
    key = tpm.generate_key(simulator.path_uri(tmp_path / "k.pem"), "ec-p256")
    token = verifier.create_enrollment_tokens()[0]
    request = tpm_attestation.attestation_request(key)
    # A self-signed certificate of the test device CA is no EK certificate the verifier trusts.
    cert_path, _ = write_ca(tmp_path)
    untrusted = x509.load_pem_x509_certificate(cert_path.read_bytes())
    request["ek_certificate"] = b64url_encode(untrusted.public_bytes(serialization.Encoding.DER))

    with TestClient(create_app(verifier)) as client:
        response = client.post(
            "/v1/enroll/attestation", json={"enrollment_token": token, **request}
        )

    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}


# Provisioning against `device-sdk verifier serve`


@pytest.fixture
def attesting_server(
    uvicorn_factory: UvicornFactory, ek_ca: EndorsementCA, tmp_path: Path
) -> VerifierServer:
    """A served verifier that requires attestation and issues device certificates."""
    ca_dir = tmp_path / "device-ca"
    ca_dir.mkdir()
    ca_cert, ca_key = write_ca(ca_dir)
    return serve_verifier(
        uvicorn_factory,
        tmp_path / "verifier",
        extra_args=(
            "--ek-ca", str(ek_ca.root_path), "--ek-ca", str(ek_ca.issuer_path),
            "--require-attestation",
            "--device-ca-cert", str(ca_cert), "--device-ca-key", str(ca_key),
        ),
    )  # fmt: skip


def token_file(server: VerifierServer, path: Path) -> Path:
    verifier = Verifier.open(server.db_path, VerifierConfig(issuer=MANAGEMENT_ISSUER))
    try:
        (token,) = verifier.create_enrollment_tokens(1)
    finally:
        verifier.close()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    return path


def test_provision_tpm_attested_with_certificate(
    attesting_server: VerifierServer, simulator: Swtpm, tmp_path: Path
) -> None:
    config_path = tmp_path / "device.toml"
    request = ProvisioningRequest(
        key_uri=simulator.path_uri(tmp_path / "device.tss2.pem"),
        config_path=config_path,
        verifier_url=attesting_server.url,
        enrollment_token_file=token_file(attesting_server, tmp_path / "token"),
    )

    result = provision(request)

    assert "the TPM answered the verifier's attestation challenge" in result.messages
    certificate_path = certificate_path_for(config_path.absolute())
    assert result.certificate_location == str(certificate_path)
    certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    assert certificate.subject.rfc4514_string() == f"CN={result.device_id}"
    verifier = Verifier.open(attesting_server.db_path, VerifierConfig(issuer=MANAGEMENT_ISSUER))
    try:
        record = verifier.get_device(result.device_id)
        stored_certificate = verifier.registry.device_certificate(result.device_id)
    finally:
        verifier.close()
    assert record is not None
    assert record.attested is True
    assert stored_certificate == certificate_path.read_text()


def test_provision_softhsm_refused_when_attestation_required(
    attesting_server: VerifierServer, softhsm_key_uri: str, tmp_path: Path
) -> None:
    request = ProvisioningRequest(
        key_uri=softhsm_key_uri,
        config_path=tmp_path / "device.toml",
        verifier_url=attesting_server.url,
        enrollment_token_file=token_file(attesting_server, tmp_path / "token"),
        allow_software_key=True,
    )

    with pytest.raises(ProvisioningError) as caught:
        provision(request)

    assert caught.value.step == "enroll"
    assert "accepts only TPM-attested keys (--require-attestation)" in str(caught.value)
    assert "reason=attestation_required" in attesting_server.log_text()
