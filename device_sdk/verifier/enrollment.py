"""Enrollment steps: device records from CSRs, device certificates, and TPM attestation rounds."""

from __future__ import annotations

import json
import re
from collections.abc import Set
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from device_sdk.auth.encoding import b64url_decode, b64url_encode
from device_sdk.errors import ProtocolError, VerificationError
from device_sdk.keys.base import compute_device_id
from device_sdk.verifier.device_ca import DeviceCA
from device_sdk.verifier.registry import ACTIVE, DeviceRecord
from device_sdk.verifier.signatures import PublicKey, algorithm_for_public_key
from device_sdk.verifier.tpm_attestation import (
    AttestationResult,
    PendingAttestation,
    TpmAttestationVerifier,
    parse_tpmt_public,
)

MAX_CSR_BYTES = 16384
_BACKEND = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")


def record_from_csr(
    csr_pem: str | bytes,
    backend: str,
    hardware_backed: bool,
    algorithms: Set[str],
    now: int,
) -> DeviceRecord:
    """Build the record of a new device from its CSR, which must be signed by the key it names.

    ``algorithms`` is the verifier's allow-list. Raises :class:`VerificationError` with
    ``bad_csr`` (unparsable, badly signed, oversized, or an invalid ``backend`` or
    ``hardware_backed``) or ``unsupported_algorithm``.
    """
    if isinstance(csr_pem, str):
        try:
            csr_pem = csr_pem.encode("utf-8")
        except UnicodeEncodeError:
            raise VerificationError("bad_csr", "CSR text is not valid Unicode") from None
    if not isinstance(csr_pem, bytes) or len(csr_pem) > MAX_CSR_BYTES:
        raise VerificationError("bad_csr", f"CSR is not PEM text of at most {MAX_CSR_BYTES} bytes")
    # load_pem_x509_csr reads the first PEM block and ignores the rest, so a second CSR or any
    # other block after it would pass unseen.
    if csr_pem.count(b"-----BEGIN ") != 1:
        raise VerificationError("bad_csr", "CSR text must contain exactly one PEM block")
    if not isinstance(backend, str) or not _BACKEND.fullmatch(backend):
        raise VerificationError("bad_csr", "backend is not a short lowercase name")
    if not isinstance(hardware_backed, bool):
        raise VerificationError("bad_csr", "hardware_backed is not a boolean")

    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        public_key = csr.public_key()
        signature_valid = csr.is_signature_valid
    except (ValueError, TypeError):
        raise VerificationError("bad_csr", "CSR does not parse") from None
    except UnsupportedAlgorithm:
        raise VerificationError("unsupported_algorithm", "CSR key type is not supported") from None
    if not signature_valid:
        raise VerificationError("bad_csr", "CSR signature does not verify with its key")

    algorithm = algorithm_for_public_key(public_key)
    if algorithm not in algorithms:
        raise VerificationError("unsupported_algorithm", f"{algorithm} keys are not allowed")
    public_pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
    return DeviceRecord(
        device_id=compute_device_id(public_key),  # type: ignore[arg-type]
        algorithm=algorithm,
        public_key_pem=public_pem,
        status=ACTIVE,
        backend=backend,
        hardware_backed=hardware_backed,
        enrolled_at=now,
    )


@dataclass(frozen=True)
class Enrollment:
    """The outcome of an enrollment: the stored record, whether it is new, and its certificate.

    ``certificate_pem`` is None when the verifier has no device CA.
    """

    record: DeviceRecord
    created: bool
    certificate_pem: str | None


def issue_certificate(ca: DeviceCA, csr_pem: str | bytes, device_id: str, now: int) -> str:
    """Return a client certificate from the device CA for the key of an accepted CSR."""
    if isinstance(csr_pem, str):
        csr_pem = csr_pem.encode("utf-8")
    return ca.issue(x509.load_pem_x509_csr(csr_pem), device_id, now)


def begin_attestation(
    attestation: TpmAttestationVerifier, request: dict[str, Any]
) -> tuple[dict[str, str], str, str]:
    """Check round one of TPM attestation and make its credential challenge.

    ``request`` has ``ek_certificate``, ``ak_public`` and ``key_public`` (the TPMT_PUBLIC of the
    key to enroll), base64url. Returns the challenge for the device, the state to keep until
    :func:`finish_attestation` (JSON text), and the device id of ``key_public``.
    """
    if not isinstance(request, dict):
        raise VerificationError("attestation_malformed", "attestation request is not an object")
    key_public = request.get("key_public")
    if not isinstance(key_public, str):
        raise VerificationError("attestation_malformed", "key_public is missing")
    try:
        key = parse_tpmt_public(b64url_decode(key_public))
    except ProtocolError as exc:
        raise VerificationError("attestation_malformed", f"key_public: {exc}") from None
    device_id = compute_device_id(key.public_key)

    challenge, pending = attestation.start(request)
    state = {
        "secret": b64url_encode(pending.secret),
        "nonce": b64url_encode(pending.nonce),
        "ak_public": b64url_encode(pending.ak_public),
        "ek_certificate": b64url_encode(pending.ek_certificate),
        "key_public": key_public,
        "device_id": device_id,
    }
    return challenge.to_json(), json.dumps(state), device_id


def finish_attestation(
    attestation: TpmAttestationVerifier,
    state_json: str,
    evidence: dict[str, Any],
    public_key: PublicKey,
) -> AttestationResult:
    """Check round two of TPM attestation for the key the CSR names.

    ``state_json`` is what :func:`begin_attestation` returned for the same enrollment token.
    The certified key must be the one round one named and the one the CSR carries.
    """
    state = json.loads(state_json)
    if not isinstance(evidence, dict):
        raise VerificationError("attestation_malformed", "attestation evidence is not an object")
    if evidence.get("key_public") != state["key_public"]:
        raise VerificationError(
            "attestation_wrong_key", "key_public differs from the one in the attestation request"
        )
    pending = PendingAttestation(
        secret=b64url_decode(state["secret"]),
        nonce=b64url_decode(state["nonce"]),
        ak_public=b64url_decode(state["ak_public"]),
        ek_certificate=b64url_decode(state["ek_certificate"]),
    )
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise VerificationError("attestation_wrong_key", "a TPM key is an EC or RSA key")
    return attestation.finish(pending, evidence, public_key)
