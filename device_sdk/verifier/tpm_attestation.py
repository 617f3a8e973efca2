"""Checking that a device key lives in a genuine TPM 2.0, in pure Python (no TSS needed).

Two rounds, both between the verifier and the device at enrollment:

1. The device sends its endorsement key (EK) certificate and the public area of its attestation
   key (AK). :meth:`TpmAttestationVerifier.start` checks the EK certificate's chain to a trusted
   CA and the AK's attributes, and returns a :class:`CredentialChallenge`: a random secret that
   TPM2_MakeCredential encrypted to the EK for the AK's name, and a fresh nonce. Only the TPM that
   contains both keys can recover the secret (TPM2_ActivateCredential).
2. The device returns the secret and a TPM2_Certify of its signing key by the AK with the nonce
   as qualifying data. :meth:`TpmAttestationVerifier.finish` checks the secret, the AK's
   signature, the TPMS_ATTEST structure (magic, type, extraData, the certified key's name) and
   the signing key's attributes (fixedTPM, fixedParent, sensitiveDataOrigin, sign-only).

Every rejection is a :class:`~device_sdk.errors.VerificationError` whose ``reason`` is one of
:data:`REASONS`. Structures follow TPM 2.0 Part 2 (Structures), marshalled big-endian.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:
    # cryptography 47 moved CFB, which TPM credentials use, to the "decrepit" modes.
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - cryptography before 47
    from cryptography.hazmat.primitives.ciphers.modes import CFB  # type: ignore[assignment]

from device_sdk.auth.encoding import b64url_decode, b64url_encode
from device_sdk.errors import ProtocolError, VerificationError

__all__ = [
    "REASONS",
    "AttestationResult",
    "CertifyInfo",
    "CredentialChallenge",
    "PendingAttestation",
    "TpmAttestationVerifier",
    "TpmPublic",
    "kdfa",
    "make_credential",
    "parse_certify_info",
    "parse_tpmt_public",
]

REASONS = (
    "attestation_malformed",
    "attestation_untrusted_ek",
    "attestation_bad_ak",
    "attestation_credential_mismatch",
    "attestation_bad_signature",
    "attestation_replayed",
    "attestation_wrong_key",
    "attestation_key_attributes",
)

TPM_GENERATED_VALUE = 0xFF544347  # "\xffTCG": TPMS_ATTEST.magic of TPM-made structures
TPM_ST_ATTEST_CERTIFY = 0x8017

TPM_ALG_RSA = 0x0001
TPM_ALG_SHA256 = 0x000B
TPM_ALG_NULL = 0x0010
TPM_ALG_ECC = 0x0023
TPM_ECC_NIST_P256 = 0x0003
TPM_ECC_NIST_P384 = 0x0004
_CURVES: dict[int, ec.EllipticCurve] = {
    TPM_ECC_NIST_P256: ec.SECP256R1(),
    TPM_ECC_NIST_P384: ec.SECP384R1(),
}

# TPMA_OBJECT bits.
FIXED_TPM = 1 << 1
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
USER_WITH_AUTH = 1 << 6
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN = 1 << 18

MAX_CHAIN_LENGTH = 5


def _reject(reason: str, detail: str) -> VerificationError:
    return VerificationError(reason, detail)


class _Reader:
    """Reads TPM 2.0 marshalled fields; any short read raises ``attestation_malformed``."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.offset = 0
        self.what = what

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise _reject("attestation_malformed", f"{self.what} ends early")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def sized(self) -> bytes:
        """Read a TPM2B: a 16-bit size and that many bytes."""
        return self.take(self.u16())

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise _reject(
                "attestation_malformed",
                f"{self.what} has {len(self.data) - self.offset} bytes after its end",
            )


@dataclass(frozen=True)
class TpmPublic:
    """A parsed TPMT_PUBLIC: the public area of a TPM key, and its TPM name."""

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    scheme: int
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey

    @property
    def name(self) -> bytes:
        """The TPM name: nameAlg followed by the nameAlg digest of the marshalled public area."""
        return struct.pack(">H", self.name_alg) + hashlib.sha256(self.raw).digest()

    def has(self, flag: int) -> bool:
        return bool(self.attributes & flag)


def _skip_symmetric(reader: _Reader) -> None:
    if reader.u16() != TPM_ALG_NULL:
        reader.u16()  # keyBits
        reader.u16()  # mode


def _scheme(reader: _Reader) -> int:
    scheme = reader.u16()
    if scheme != TPM_ALG_NULL:
        reader.u16()  # the scheme's hashAlg
    return scheme


def parse_tpmt_public(data: bytes) -> TpmPublic:
    """Parse a marshalled TPMT_PUBLIC of an ECC or RSA key; only SHA-256 names are accepted."""
    reader = _Reader(data, "TPMT_PUBLIC")
    key_type = reader.u16()
    name_alg = reader.u16()
    attributes = reader.u32()
    reader.sized()  # authPolicy
    if name_alg != TPM_ALG_SHA256:
        raise _reject("attestation_malformed", f"name algorithm 0x{name_alg:04x} is not SHA-256")

    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    if key_type == TPM_ALG_ECC:
        _skip_symmetric(reader)
        scheme = _scheme(reader)
        curve_id = reader.u16()
        _scheme(reader)  # kdf
        x = reader.sized()
        y = reader.sized()
        curve = _CURVES.get(curve_id)
        if curve is None:
            raise _reject("attestation_malformed", f"unsupported ECC curve 0x{curve_id:04x}")
        try:
            public_key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
            ).public_key()
        except ValueError as exc:
            raise _reject("attestation_malformed", f"ECC point is invalid: {exc}") from exc
    elif key_type == TPM_ALG_RSA:
        _skip_symmetric(reader)
        scheme = _scheme(reader)
        bits = reader.u16()
        exponent = reader.u32() or 65537
        modulus = int.from_bytes(reader.sized(), "big")
        if modulus.bit_length() != bits:
            raise _reject("attestation_malformed", f"RSA modulus is not {bits} bits")
        public_key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
    else:
        raise _reject("attestation_malformed", f"unsupported key type 0x{key_type:04x}")
    reader.finish()
    return TpmPublic(data, key_type, name_alg, attributes, scheme, public_key)


@dataclass(frozen=True)
class CertifyInfo:
    """The fields of a TPMS_ATTEST of type TPM_ST_ATTEST_CERTIFY that the verifier checks."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    reset_count: int
    name: bytes
    qualified_name: bytes


def parse_certify_info(data: bytes) -> CertifyInfo:
    """Parse a marshalled TPMS_ATTEST; raises ``attestation_malformed`` for any other type."""
    reader = _Reader(data, "TPMS_ATTEST")
    magic = reader.u32()
    attest_type = reader.u16()
    qualified_signer = reader.sized()
    extra_data = reader.sized()
    reader.u64()  # clockInfo.clock
    reset_count = reader.u32()
    reader.u32()  # clockInfo.restartCount
    reader.u8()  # clockInfo.safe
    reader.u64()  # firmwareVersion
    if attest_type != TPM_ST_ATTEST_CERTIFY:
        raise _reject(
            "attestation_malformed", f"attestation type 0x{attest_type:04x} is not CERTIFY"
        )
    name = reader.sized()
    qualified_name = reader.sized()
    reader.finish()
    return CertifyInfo(
        magic, attest_type, qualified_signer, extra_data, reset_count, name, qualified_name
    )


def kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """Derive ``bits`` bits with the TPM's KDFa over SHA-256 (SP 800-108 counter-mode HMAC).

    Each block is HMAC(key, counter || label || 0x00 || contextU || contextV || bits), with
    32-bit big-endian counter and bits, as in tpm2-pytss 3.0's ``_kdfa``.
    """
    output = b""
    counter = 0
    while len(output) * 8 < bits:
        counter += 1
        message = (
            struct.pack(">I", counter) + label + b"\x00" + context_u + context_v
            + struct.pack(">I", bits)
        )  # fmt: skip
        output += hmac.new(key, message, hashlib.sha256).digest()
    return output[: bits // 8]


@dataclass(frozen=True)
class CredentialChallenge:
    """Round one's output for the device: the encrypted credential and the nonce to certify."""

    credential_blob: bytes
    encrypted_secret: bytes
    nonce: bytes

    def to_json(self) -> dict[str, str]:
        return {
            "credential_blob": b64url_encode(self.credential_blob),
            "encrypted_secret": b64url_encode(self.encrypted_secret),
            "nonce": b64url_encode(self.nonce),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CredentialChallenge:
        return cls(
            _field(data, "credential_blob"), _field(data, "encrypted_secret"), _field(data, "nonce")
        )


def make_credential(ek_public: TpmPublic, object_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software for an RSA 2048 EK with the default EK template.

    Returns the TPM2B_ID_OBJECT contents (credentialBlob) and the TPM2B_ENCRYPTED_SECRET contents.
    Only the TPM holding the EK's private part and an object named ``object_name`` can undo it.
    """
    if ek_public.type != TPM_ALG_RSA or not isinstance(ek_public.public_key, rsa.RSAPublicKey):
        raise _reject("attestation_untrusted_ek", "only RSA endorsement keys are supported")

    # As in tpm2-pytss 3.0's utils.make_credential: the seed is RSA-OAEP (SHA-256) encrypted to
    # the EK with the label "IDENTITY" and its NUL.
    seed = secrets.token_bytes(32)
    encrypted_seed = ek_public.public_key.encrypt(
        seed,
        padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"IDENTITY\x00"
        ),
    )

    # The credential (a TPM2B) is AES-128-CFB encrypted with a zero IV, the EK's symmetric
    # algorithm, and an HMAC over it and the object's name protects its integrity.
    symmetric_key = kdfa(seed, b"STORAGE", object_name, b"", 128)
    plaintext = struct.pack(">H", len(secret)) + secret
    encryptor = Cipher(algorithms.AES(symmetric_key), CFB(b"\x00" * 16)).encryptor()
    encrypted_identity = encryptor.update(plaintext) + encryptor.finalize()
    hmac_key = kdfa(seed, b"INTEGRITY", b"", b"", 256)
    integrity = hmac.new(hmac_key, encrypted_identity + object_name, hashlib.sha256).digest()
    credential_blob = struct.pack(">H", len(integrity)) + integrity + encrypted_identity
    return credential_blob, encrypted_seed


@dataclass(frozen=True)
class PendingAttestation:
    """Verifier state between the rounds; store it server-side with the enrollment."""

    secret: bytes
    nonce: bytes
    ak_public: bytes
    ek_certificate: bytes


@dataclass(frozen=True)
class AttestationResult:
    """A successful attestation: the EK certificate's subject and the attested key's name."""

    ek_issuer: str
    ek_serial: int
    key_name: bytes


def _field(data: dict[str, Any], name: str) -> bytes:
    value = data.get(name) if isinstance(data, dict) else None
    if not isinstance(value, str) or not value:
        raise _reject("attestation_malformed", f"{name} is missing or not a base64url string")
    try:
        return b64url_decode(value)
    except ProtocolError as exc:
        raise _reject("attestation_malformed", f"{name} is not base64url: {exc}") from exc


class TpmAttestationVerifier:
    """Checks TPM key attestation against trusted EK certificate authorities (see the module)."""

    def __init__(
        self,
        trusted_roots: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate] = (),
    ) -> None:
        if not trusted_roots:
            raise ValueError("give at least one trusted EK root certificate")
        self.trusted_roots = list(trusted_roots)
        self.intermediates = list(intermediates)

    # --- round one ----------------------------------------------------------------------------

    def start(self, request: dict[str, Any]) -> tuple[CredentialChallenge, PendingAttestation]:
        """Check the EK certificate and AK, and make the credential challenge for round two.

        ``request`` has ``ek_certificate`` (DER) and ``ak_public`` (TPMT_PUBLIC), base64url.
        """
        ek_der = _field(request, "ek_certificate")
        ak_raw = _field(request, "ak_public")
        try:
            ek_certificate = x509.load_der_x509_certificate(ek_der)
        except ValueError as exc:
            raise _reject("attestation_malformed", f"EK certificate does not parse: {exc}") from exc
        self._check_chain(ek_certificate)

        ak = parse_tpmt_public(ak_raw)
        _check_attestation_key(ak)
        ek_public = _ek_public_from_certificate(ek_certificate)
        secret = secrets.token_bytes(32)
        nonce = secrets.token_bytes(32)
        credential_blob, encrypted_secret = make_credential(ek_public, ak.name, secret)
        return (
            CredentialChallenge(credential_blob, encrypted_secret, nonce),
            PendingAttestation(secret, nonce, ak_raw, ek_der),
        )

    def _check_chain(self, certificate: x509.Certificate) -> None:
        now = datetime.now(UTC)
        current = certificate
        for _ in range(MAX_CHAIN_LENGTH):
            if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
                raise _reject(
                    "attestation_untrusted_ek",
                    f"certificate {current.subject.rfc4514_string()!r} is outside its validity",
                )
            for root in self.trusted_roots:
                if _issued_by(current, root):
                    return
            issuer = next((c for c in self.intermediates if _issued_by(current, c)), None)
            if issuer is None:
                raise _reject(
                    "attestation_untrusted_ek",
                    f"no trusted CA issued {current.subject.rfc4514_string()!r} "
                    f"(issuer {current.issuer.rfc4514_string()!r})",
                )
            _require_ca(issuer)
            current = issuer
        raise _reject("attestation_untrusted_ek", f"EK chain longer than {MAX_CHAIN_LENGTH}")

    # --- round two ----------------------------------------------------------------------------

    def finish(
        self,
        pending: PendingAttestation,
        evidence: dict[str, Any],
        expected_public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    ) -> AttestationResult:
        """Check the device's response to :meth:`start`'s challenge for the key it enrolls.

        ``evidence`` has ``credential_secret``, ``key_public`` (TPMT_PUBLIC), ``certify_info``
        (TPMS_ATTEST) and ``signature`` (DER ECDSA by the AK), base64url.
        """
        secret = _field(evidence, "credential_secret")
        if not hmac.compare_digest(secret, pending.secret):
            raise _reject(
                "attestation_credential_mismatch",
                "the credential secret differs: the AK is not in the TPM that holds the EK",
            )

        ak = parse_tpmt_public(pending.ak_public)
        attest = _field(evidence, "certify_info")
        signature = _field(evidence, "signature")
        _verify_ak_signature(ak, attest, signature)

        info = parse_certify_info(attest)
        if info.magic != TPM_GENERATED_VALUE:
            raise _reject("attestation_malformed", f"magic 0x{info.magic:08x} is not TPM_GENERATED")
        if not hmac.compare_digest(info.extra_data, pending.nonce):
            raise _reject("attestation_replayed", "extraData is not this enrollment's nonce")

        key = parse_tpmt_public(_field(evidence, "key_public"))
        if info.name != key.name:
            raise _reject("attestation_wrong_key", "the certified name is not key_public's name")
        if key.public_key.public_numbers() != expected_public_key.public_numbers():
            raise _reject("attestation_wrong_key", "key_public is not the enrolled public key")
        _check_signing_key(key)

        ek = x509.load_der_x509_certificate(pending.ek_certificate)
        return AttestationResult(ek.issuer.rfc4514_string(), ek.serial_number, key.name)


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    if certificate.issuer != issuer.subject:
        return False
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _require_ca(certificate: x509.Certificate) -> None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise _reject(
            "attestation_untrusted_ek",
            f"{certificate.subject.rfc4514_string()!r} issued the EK certificate but is not a CA",
        )


def _ek_public_from_certificate(certificate: x509.Certificate) -> TpmPublic:
    """Return the EK public key in the form make_credential takes; its TPM name is not needed."""
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != 2048:
        raise _reject("attestation_untrusted_ek", "the EK certificate is not for an RSA 2048 key")
    return TpmPublic(b"", TPM_ALG_RSA, TPM_ALG_SHA256, 0, TPM_ALG_NULL, key)


def _check_attestation_key(ak: TpmPublic) -> None:
    # A restricted signing key signs only TPM-made structures, so its TPMS_ATTEST is trustworthy.
    required = {"fixedTPM": FIXED_TPM, "fixedParent": FIXED_PARENT, "restricted": RESTRICTED}
    required.update(sign=SIGN, sensitiveDataOrigin=SENSITIVE_DATA_ORIGIN)
    missing = [name for name, flag in required.items() if not ak.has(flag)]
    if missing:
        raise _reject("attestation_bad_ak", f"the attestation key lacks {', '.join(missing)}")
    if ak.has(DECRYPT):
        raise _reject("attestation_bad_ak", "the attestation key can also decrypt")
    if ak.type != TPM_ALG_ECC:
        raise _reject("attestation_bad_ak", "the attestation key is not an ECC key")


def _check_signing_key(key: TpmPublic) -> None:
    required = {
        "fixedTPM": FIXED_TPM,
        "fixedParent": FIXED_PARENT,
        "sensitiveDataOrigin": SENSITIVE_DATA_ORIGIN,
        "sign": SIGN,
    }
    missing = [name for name, flag in required.items() if not key.has(flag)]
    if missing:
        raise _reject("attestation_key_attributes", f"the device key lacks {', '.join(missing)}")
    if key.has(DECRYPT) or key.has(RESTRICTED):
        raise _reject("attestation_key_attributes", "the device key is not a plain sign-only key")


def _verify_ak_signature(ak: TpmPublic, attest: bytes, signature: bytes) -> None:
    assert isinstance(ak.public_key, ec.EllipticCurvePublicKey)
    try:
        ak.public_key.verify(signature, attest, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise _reject(
            "attestation_bad_signature", "the AK signature over certify_info does not verify"
        ) from exc
