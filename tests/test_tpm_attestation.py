"""TPM key attestation on swtpm with EK certificates from a local CA: device and verifier sides."""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fixtures_tpm import EndorsementCA, Swtpm, require_tpm_stack

from device_sdk.auth.encoding import b64url_decode, b64url_encode
from device_sdk.errors import VerificationError
from device_sdk.verifier.tpm_attestation import (
    CredentialChallenge,
    TpmAttestationVerifier,
    kdfa,
    parse_certify_info,
    parse_tpmt_public,
)

try:
    from tpm2_pytss import ESYS_TR, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMA_OBJECT
    from tpm2_pytss.internal.crypto import _kdfa
    from tpm2_pytss.tsskey import TSSPrivKey

    from device_sdk.keys import tpm, tpm_attestation, tpm_connection
    from device_sdk.keys.signing import hardware_key_for
except ImportError:
    # The autouse fixture below skips every test, with the install command as the reason.
    pass


@pytest.fixture(autouse=True)
def _tpm_stack() -> None:
    require_tpm_stack()


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def verifier(swtpm_with_ek: tuple[Swtpm, EndorsementCA]) -> TpmAttestationVerifier:
    _, ca = swtpm_with_ek
    return TpmAttestationVerifier(
        [load_certificate(ca.root_path)], intermediates=[load_certificate(ca.issuer_path)]
    )


@pytest.fixture
def simulator(swtpm_with_ek: tuple[Swtpm, EndorsementCA]) -> Swtpm:
    return swtpm_with_ek[0]


def attest(key: Any, verifier: TpmAttestationVerifier) -> tuple[Any, dict[str, str]]:
    """Run both rounds on the device side; return the verifier's pending state and the evidence."""
    request = tpm_attestation.attestation_request(key)
    challenge, pending = verifier.start(request)
    evidence = tpm_attestation.answer_challenge(key, challenge.to_json())
    return pending, evidence


@pytest.mark.parametrize("kind", ["handle", "path"])
def test_attested_key_passes(
    kind: str, simulator: Swtpm, verifier: TpmAttestationVerifier, tmp_path: Path
) -> None:
    uri = simulator.handle_uri() if kind == "handle" else simulator.path_uri(tmp_path / "k.pem")
    key = tpm.generate_key(uri, "ec-p256")

    pending, evidence = attest(key, verifier)
    result = verifier.finish(pending, evidence, key.public_key())

    assert result.ek_issuer == "CN=swtpm-localca"
    assert result.key_name == parse_tpmt_public(b64url_decode(evidence["key_public"])).name
    info = parse_certify_info(b64url_decode(evidence["certify_info"]))
    assert info.extra_data == pending.nonce


def test_attestation_leaves_no_transient_objects(
    simulator: Swtpm, verifier: TpmAttestationVerifier, tmp_path: Path
) -> None:
    key = tpm.generate_key(simulator.path_uri(tmp_path / "k.pem"), "ec-p256")

    for _ in range(3):
        attest(key, verifier)

    context = tpm_connection.connection_for(simulator.tcti).context
    from tpm2_pytss import TPM2_CAP, TPM2_HC

    _, data = context.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 10)
    assert data.data.handles.count == 0
    _, data = context.get_capability(TPM2_CAP.HANDLES, TPM2_HC.LOADED_SESSION_FIRST, 10)
    assert data.data.handles.count == 0


def test_forged_certify_rejected(simulator: Swtpm, verifier: TpmAttestationVerifier) -> None:
    key = tpm.generate_key(simulator.handle_uri(), "ec-p256")
    pending, evidence = attest(key, verifier)
    attest_bytes = bytearray(b64url_decode(evidence["certify_info"]))
    attest_bytes[-1] ^= 1

    forged = {**evidence, "certify_info": b64url_encode(bytes(attest_bytes))}

    with pytest.raises(VerificationError) as info:
        verifier.finish(pending, forged, key.public_key())
    assert info.value.reason == "attestation_bad_signature"


def test_replayed_certify_rejected(simulator: Swtpm, verifier: TpmAttestationVerifier) -> None:
    key = tpm.generate_key(simulator.handle_uri(), "ec-p256")
    _, old_evidence = attest(key, verifier)
    pending, new_evidence = attest(key, verifier)

    # The attacker answers the new credential but replays the old certify structure.
    replayed = {
        **old_evidence,
        "credential_secret": new_evidence["credential_secret"],
    }

    with pytest.raises(VerificationError) as info:
        verifier.finish(pending, replayed, key.public_key())
    assert info.value.reason == "attestation_replayed"


def test_wrong_credential_secret_rejected(
    simulator: Swtpm, verifier: TpmAttestationVerifier
) -> None:
    key = tpm.generate_key(simulator.handle_uri(), "ec-p256")
    pending, evidence = attest(key, verifier)

    guessed = {**evidence, "credential_secret": b64url_encode(b"\x00" * 32)}

    with pytest.raises(VerificationError) as info:
        verifier.finish(pending, guessed, key.public_key())
    assert info.value.reason == "attestation_credential_mismatch"


def test_other_public_key_rejected(simulator: Swtpm, verifier: TpmAttestationVerifier) -> None:
    key = tpm.generate_key(simulator.handle_uri(), "ec-p256")
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    pending, evidence = attest(key, verifier)

    with pytest.raises(VerificationError) as info:
        verifier.finish(pending, evidence, other)
    assert info.value.reason == "attestation_wrong_key"


def test_key_without_fixed_tpm_rejected(simulator: Swtpm, verifier: TpmAttestationVerifier) -> None:
    # A duplicable key: the backend refuses to open it, so it is wrapped by hand here.
    connection = tpm_connection.connection_for(simulator.tcti)
    context = connection.context
    attributes = (
        TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT
    )
    primary, _, _, _, _ = context.create_primary(
        TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=tpm.srk_template()), ESYS_TR.RH_OWNER
    )
    private, public, _, _, _ = context.create(
        primary, TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC.parse("ecc256", objectAttributes=attributes)
    )
    context.flush_context(primary)
    blob = TSSPrivKey(private, public, empty_auth=True, parent=0x40000001)
    source = tpm._BlobSource(blob, "duplicable")
    signer = tpm.TpmSigner(connection, source, public.publicArea, "duplicable test key")
    public_key = tpm._public_key(public.publicArea)
    key = hardware_key_for(signer, public_key, uri="tpm2:test", backend="tpm", hardware_backed=True)

    pending, evidence = attest(key, verifier)

    with pytest.raises(VerificationError, match="lacks fixedTPM, fixedParent") as info:
        verifier.finish(pending, evidence, public_key)
    assert info.value.reason == "attestation_key_attributes"


def _self_signed_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def test_ek_from_untrusted_ca_rejected(
    simulator: Swtpm, swtpm_with_ek: tuple[Swtpm, EndorsementCA]
) -> None:
    key = tpm.generate_key(simulator.handle_uri(), "ec-p256")
    other_root, _ = _self_signed_ca("another EK CA")
    _, ca = swtpm_with_ek
    verifier = TpmAttestationVerifier(
        [other_root], intermediates=[load_certificate(ca.issuer_path)]
    )

    with pytest.raises(VerificationError, match="no trusted CA issued") as info:
        verifier.start(tpm_attestation.attestation_request(key))
    assert info.value.reason == "attestation_untrusted_ek"


def test_ek_certificate_forged_with_same_name_rejected(
    simulator: Swtpm, swtpm_with_ek: tuple[Swtpm, EndorsementCA]
) -> None:
    # An attacker's CA that copies the real issuing CA's name must not pass as that CA.
    key = tpm.generate_key(simulator.handle_uri(), "ec-p256")
    _, ca = swtpm_with_ek
    real_issuer = load_certificate(ca.issuer_path)
    fake_root, fake_key = _self_signed_ca("swtpm-localca")
    request = tpm_attestation.attestation_request(key)
    real_ek = x509.load_der_x509_certificate(b64url_decode(request["ek_certificate"]))
    now = datetime.datetime.now(datetime.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(real_ek.subject)
        .issuer_name(real_issuer.subject)
        .public_key(real_ek.public_key())
        .serial_number(7)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(fake_key, hashes.SHA256())
    )
    verifier = TpmAttestationVerifier(
        [load_certificate(ca.root_path)], intermediates=[real_issuer, fake_root]
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    request["ek_certificate"] = b64url_encode(forged.public_bytes(Encoding.DER))

    with pytest.raises(VerificationError) as info:
        verifier.start(request)
    assert info.value.reason == "attestation_untrusted_ek"


def test_signing_key_as_ak_rejected(simulator: Swtpm, verifier: TpmAttestationVerifier) -> None:
    # An unrestricted key could sign a made-up TPMS_ATTEST, so it must not serve as the AK.
    key = tpm.generate_key(simulator.handle_uri(), "ec-p256")
    request = tpm_attestation.attestation_request(key)
    request["ak_public"] = b64url_encode(key.signer.public_area.marshal())

    with pytest.raises(VerificationError, match="lacks restricted") as info:
        verifier.start(request)
    assert info.value.reason == "attestation_bad_ak"


def test_malformed_evidence_rejected(simulator: Swtpm, verifier: TpmAttestationVerifier) -> None:
    key = tpm.generate_key(simulator.handle_uri(), "ec-p256")
    challenge, pending = verifier.start(tpm_attestation.attestation_request(key))
    evidence = tpm_attestation.answer_challenge(key, challenge.to_json())

    for name in ("certify_info", "key_public", "signature", "credential_secret"):
        broken = {**evidence}
        del broken[name]
        with pytest.raises(VerificationError) as info:
            verifier.finish(pending, broken, key.public_key())
        assert info.value.reason == "attestation_malformed", name
    truncated = {**evidence, "key_public": evidence["key_public"][:20]}
    with pytest.raises(VerificationError) as info:
        verifier.finish(pending, truncated, key.public_key())
    assert info.value.reason == "attestation_malformed"


def test_challenge_json_round_trip() -> None:
    challenge = CredentialChallenge(b"blob", b"secret", b"n" * 32)

    assert CredentialChallenge.from_json(challenge.to_json()) == challenge


@pytest.mark.parametrize(
    ("label", "context_u", "bits"),
    [(b"STORAGE", b"\x00\x0b" + b"n" * 32, 128), (b"INTEGRITY", b"", 256), (b"X", b"", 520)],
)
def test_kdfa_matches_tpm2_pytss(label: bytes, context_u: bytes, bits: int) -> None:
    key = hashlib.sha256(b"seed").digest()

    assert kdfa(key, label, context_u, b"", bits) == _kdfa(0x000B, key, label, context_u, b"", bits)
