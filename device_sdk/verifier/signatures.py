"""Signature checks for device assertions, done with ``cryptography`` directly.

Each JWS algorithm accepts exactly one signature encoding: raw r||s of the curve's exact width for
ES256 and ES384 (RFC 7518, section 3.4), 64 bytes for EdDSA, and exactly the modulus length for
PS256 with a salt as long as the SHA-256 digest. DER, truncated, padded, empty or all-zero
signatures are rejected before any curve arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from device_sdk.errors import VerificationError

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

SUPPORTED_ALGORITHMS = frozenset({"ES256", "ES384", "EdDSA", "PS256"})

MIN_RSA_BITS = 2048
ED25519_SIGNATURE_BYTES = 64

# Curve, coordinate width, group order (so r and s outside 1..n-1 are rejected by a plain
# comparison) and signature algorithm of each ECDSA JWS algorithm.
_EC_PARAMETERS: dict[str, tuple[str, int, int, ec.ECDSA]] = {
    "ES256": (
        "secp256r1",
        32,
        0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
        ec.ECDSA(hashes.SHA256()),
    ),
    "ES384": (
        "secp384r1",
        48,
        int(
            "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
            "581A0DB248B0A77AECEC196ACCC52973",
            16,
        ),
        ec.ECDSA(hashes.SHA384()),
    ),
}

_PSS_PADDING = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def algorithm_for_public_key(public_key: object) -> str:
    """Return the JWS algorithm a device key signs with, or raise ``unsupported_algorithm``."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        for algorithm, (curve, *_rest) in _EC_PARAMETERS.items():
            if public_key.curve.name == curve:
                return algorithm
        raise VerificationError(
            "unsupported_algorithm", f"curve {public_key.curve.name}; use P-256 or P-384"
        )
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise VerificationError(
                "unsupported_algorithm", f"RSA-{public_key.key_size}; use at least {MIN_RSA_BITS}"
            )
        return "PS256"
    raise VerificationError("unsupported_algorithm", f"key type {type(public_key).__name__}")


SignatureCheck = Callable[[bytes, bytes], None]
"""Check ``(message, signature)`` for one key and algorithm; raise ``bad_signature`` if invalid."""


def _bad(detail: str) -> VerificationError:
    return VerificationError("bad_signature", detail)


def _ecdsa_check(algorithm: str, public_key: PublicKey) -> SignatureCheck:
    curve, size, order, signature_algorithm = _EC_PARAMETERS[algorithm]
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != curve:
        raise VerificationError("algorithm_mismatch", f"{algorithm} needs a {curve} key")
    key = public_key

    def check(message: bytes, signature: bytes) -> None:
        if len(signature) != 2 * size:
            raise _bad(f"{len(signature)} bytes, expected raw r||s of {2 * size} bytes")
        r = int.from_bytes(signature[:size], "big")
        s = int.from_bytes(signature[size:], "big")
        if not (0 < r < order and 0 < s < order):
            raise _bad("r or s outside 1..n-1")
        try:
            key.verify(encode_dss_signature(r, s), message, signature_algorithm)
        except InvalidSignature:
            raise _bad("ECDSA verification failed") from None

    return check


def _eddsa_check(public_key: PublicKey) -> SignatureCheck:
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise VerificationError("algorithm_mismatch", "EdDSA needs an Ed25519 key")
    key = public_key

    def check(message: bytes, signature: bytes) -> None:
        if len(signature) != ED25519_SIGNATURE_BYTES:
            raise _bad(f"{len(signature)} bytes, expected {ED25519_SIGNATURE_BYTES}")
        try:
            key.verify(signature, message)
        except InvalidSignature:
            raise _bad("Ed25519 verification failed") from None

    return check


def _pss_check(public_key: PublicKey) -> SignatureCheck:
    if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size < MIN_RSA_BITS:
        raise VerificationError("algorithm_mismatch", f"PS256 needs an RSA key of {MIN_RSA_BITS}+")
    key = public_key
    size = (public_key.key_size + 7) // 8

    def check(message: bytes, signature: bytes) -> None:
        if len(signature) != size:
            raise _bad(f"{len(signature)} bytes, expected the modulus length of {size} bytes")
        try:
            key.verify(signature, message, _PSS_PADDING, hashes.SHA256())
        except InvalidSignature:
            raise _bad("RSA-PSS verification failed") from None

    return check


def signature_check(algorithm: str, public_key: PublicKey) -> SignatureCheck:
    """Prepare the signature check of one key, doing the key and algorithm checks once.

    Raises :class:`VerificationError` with ``algorithm_mismatch`` when the key does not fit the
    algorithm, and ``unsupported_algorithm`` for any algorithm outside ES256, ES384, EdDSA and
    PS256 (``none`` and HMAC among them). The verifier keeps one check per enrolled key.
    """
    if algorithm in _EC_PARAMETERS:
        return _ecdsa_check(algorithm, public_key)
    if algorithm == "EdDSA":
        return _eddsa_check(public_key)
    if algorithm == "PS256":
        return _pss_check(public_key)
    raise VerificationError("unsupported_algorithm", f"alg {algorithm[:16]!r} is not allowed")


def verify_signature(
    algorithm: str, public_key: PublicKey, message: bytes, signature: bytes
) -> None:
    """Check a JWS signature over ``message`` (the ASCII signing input ``header.payload``).

    Raises :class:`VerificationError` with reason ``bad_signature`` for a signature that does not
    verify or is not in the algorithm's one accepted encoding, and the reasons of
    :func:`signature_check` for a key or algorithm that cannot be used.
    """
    signature_check(algorithm, public_key)(message, signature)
