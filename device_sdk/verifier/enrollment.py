"""Device records built from enrollment requests: a CSR signed by the device key."""

from __future__ import annotations

import re
from collections.abc import Set

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_sdk.errors import VerificationError
from device_sdk.keys.base import compute_device_id
from device_sdk.verifier.registry import ACTIVE, DeviceRecord
from device_sdk.verifier.signatures import algorithm_for_public_key

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
        csr_pem = csr_pem.encode("utf-8")
    if not isinstance(csr_pem, bytes) or len(csr_pem) > MAX_CSR_BYTES:
        raise VerificationError("bad_csr", f"CSR is not PEM text of at most {MAX_CSR_BYTES} bytes")
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
