"""Private key classes that sign in a backend, and signature encoding conversions.

The classes here are ``cryptography`` private keys whose ``sign()`` hands the work to a backend
:class:`Signer` (a PKCS#11 token, a TPM, a serial secure element). Hashing happens on the host,
so a backend only needs a raw ECDSA, EdDSA or RSA mechanism. Export methods raise
:class:`~device_sdk.errors.KeyExportError` naming where the key lives.

ECDSA signature formats: PKCS#11 and TPMs return raw ``r || s`` (fixed width), ``cryptography``
and X.509 want DER, JWS wants raw. The conversions below never slice DER by offsets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    NoDigestInfo,
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from device_sdk.errors import KeyExportError, KeyStoreError
from device_sdk.keys.base import HardwareKey, PublicKey

__all__ = [
    "HardwareECKey",
    "HardwareEd25519Key",
    "HardwareRSAKey",
    "Signer",
    "ecdsa_der_to_raw",
    "ecdsa_raw_to_der",
    "hardware_key_for",
    "normalize_ecdsa_signature",
]

# hashlib is several times faster than cryptography's Hash object for one-shot digests, and the
# hash runs on every sign.
_HASHLIB: dict[str, Callable[[bytes], Any]] = {
    "sha224": hashlib.sha224,
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
    "sha3-256": hashlib.sha3_256,
    "sha3-384": hashlib.sha3_384,
    "sha3-512": hashlib.sha3_512,
}


class Signer(Protocol):
    """The backend half of a hardware key: signs digests or messages inside the hardware.

    ``location`` names where the key lives for error messages, for example
    ``"PKCS#11 token 'edge-01'"``. A backend implements the methods for the key types it holds.
    """

    location: str

    def sign_ecdsa_digest(self, digest: bytes) -> bytes:
        """Sign a digest with raw ECDSA; return the token's output (raw ``r || s`` or DER)."""
        ...

    def sign_eddsa(self, data: bytes) -> bytes:
        """Sign a whole message with pure EdDSA; return the 64-byte signature."""
        ...

    def sign_rsa_digest(
        self,
        digest: bytes,
        algorithm: hashes.HashAlgorithm,
        pad: padding.AsymmetricPadding,
        salt_length: int | None,
    ) -> bytes:
        """Sign a digest with RSA PSS (``salt_length`` in bytes) or PKCS #1 v1.5 (None)."""
        ...


Data = bytes | bytearray | memoryview


def digest_message(data: Data, algorithm: hashes.HashAlgorithm | Prehashed) -> bytes:
    """Hash ``data`` on the host, or check its length when it is already a ``Prehashed`` digest."""
    if isinstance(algorithm, Prehashed):
        if len(data) != algorithm.digest_size:
            raise ValueError(
                f"prehashed data is {len(data)} bytes; the digest size is {algorithm.digest_size}"
            )
        return bytes(data)
    fast = _HASHLIB.get(algorithm.name)
    if fast is not None:
        return fast(bytes(data)).digest()  # type: ignore[no-any-return]
    hasher = hashes.Hash(algorithm)
    hasher.update(data)
    return hasher.finalize()


def ecdsa_raw_to_der(signature: bytes) -> bytes:
    """Convert a raw fixed-width ``r || s`` ECDSA signature to DER.

    Raises ValueError when the length is odd or r or s is zero.
    """
    if not signature or len(signature) % 2:
        raise ValueError(f"raw ECDSA signature has odd or zero length {len(signature)}")
    half = len(signature) // 2
    r = int.from_bytes(signature[:half], "big")
    s = int.from_bytes(signature[half:], "big")
    if r == 0 or s == 0:
        raise ValueError("raw ECDSA signature has r or s equal to zero")
    return encode_dss_signature(r, s)


def ecdsa_der_to_raw(signature: bytes, curve: ec.EllipticCurve) -> bytes:
    """Convert a DER ECDSA signature to raw ``r || s``, each padded to the curve's byte width."""
    r, s = decode_dss_signature(signature)
    width = (curve.key_size + 7) // 8
    if r.bit_length() > width * 8 or s.bit_length() > width * 8:
        raise ValueError(f"ECDSA signature value wider than the {curve.name} field")
    return r.to_bytes(width, "big") + s.to_bytes(width, "big")


def _parse_strict_der_signature(signature: bytes) -> tuple[int, int] | None:
    """Return (r, s) when ``signature`` is a canonical DER ECDSA-Sig-Value, else None."""
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        return None
    if encode_dss_signature(r, s) != signature:
        return None
    return r, s


def normalize_ecdsa_signature(
    signature: bytes,
    public_key: ec.EllipticCurvePublicKey,
    digest: bytes,
    location: str,
    *,
    prefer_der: bool = False,
) -> tuple[bytes, bool]:
    """Turn a backend's ECDSA output into DER; return it and whether the backend sent DER.

    A raw signature (exactly twice the field width, as PKCS#11 requires) is re-encoded. Any other
    length must be canonical DER, and is then checked against the public key before it is
    returned, because a token that breaks the format may break other things too. A DER signature
    can also be exactly twice the field width by chance, so once a backend has sent DER, pass
    ``prefer_der=True`` to try DER first at that length.
    """
    width = (public_key.curve.key_size + 7) // 8
    if prefer_der and _parse_strict_der_signature(signature) is not None:
        return _verified_der(signature, public_key, digest, location), True
    if len(signature) == 2 * width:
        try:
            return ecdsa_raw_to_der(signature), False
        except ValueError as exc:
            raise KeyStoreError(f"{location} returned an invalid ECDSA signature: {exc}") from exc

    parsed = _parse_strict_der_signature(signature)
    if parsed is None:
        raise KeyStoreError(
            f"{location} returned a {len(signature)}-byte ECDSA signature that is neither raw "
            f"r||s ({2 * width} bytes) nor canonical DER"
        )
    return _verified_der(signature, public_key, digest, location), True


def _verified_der(
    signature: bytes, public_key: ec.EllipticCurvePublicKey, digest: bytes, location: str
) -> bytes:
    try:
        public_key.verify(signature, digest, ec.ECDSA(Prehashed(_hash_for_size(len(digest)))))
    except InvalidSignature as exc:
        raise KeyStoreError(
            f"{location} returned a DER ECDSA signature that does not verify with its public key"
        ) from exc
    return signature


def _hash_for_size(size: int) -> hashes.HashAlgorithm:
    for algorithm in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512(), hashes.SHA224()):
        if algorithm.digest_size == size:
            return algorithm
    raise KeyStoreError(f"no SHA-2 hash has a {size}-byte digest")


def _raise_export_error(location: str) -> NoReturn:
    raise KeyExportError(
        f"the private key stays inside {location} and cannot be exported; "
        "use public_key() for the public half"
    )


class _SignerHolder:
    _signer: Signer

    @property
    def signer(self) -> Signer:
        """The backend object that signs for this key."""
        return self._signer


class HardwareECKey(_SignerHolder, HardwareKey, ec.EllipticCurvePrivateKey):
    """An EC private key (P-256, P-384) held by a backend; ``sign()`` returns DER."""

    def __init__(
        self,
        signer: Signer,
        public_key: ec.EllipticCurvePublicKey,
        *,
        uri: str,
        backend: str,
        hardware_backed: bool,
    ) -> None:
        self._signer = signer
        self._public_key = public_key
        self._width = (public_key.curve.key_size + 7) // 8
        self._der_seen = False
        self.uri = uri
        self.backend = backend
        self.hardware_backed = hardware_backed

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public_key.curve

    @property
    def key_size(self) -> int:
        return self._public_key.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def sign(self, data: Data, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithm(
                f"{type(signature_algorithm).__name__} is not supported; use ec.ECDSA"
            )
        digest = digest_message(data, signature_algorithm.algorithm)
        raw = self._signer.sign_ecdsa_digest(digest)

        # Fast path: a raw signature of the expected width from a token that has never sent DER.
        if len(raw) == 2 * self._width and not self._der_seen:
            half = self._width
            r = int.from_bytes(raw[:half], "big")
            s = int.from_bytes(raw[half:], "big")
            if r and s:
                return encode_dss_signature(r, s)

        der, was_der = normalize_ecdsa_signature(
            raw, self._public_key, digest, self._location, prefer_der=self._der_seen
        )
        self._der_seen = self._der_seen or was_der
        return der

    @property
    def _location(self) -> str:
        return self._signer.location

    def exchange(
        self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey
    ) -> bytes:
        raise UnsupportedAlgorithm(f"ECDH is not offered for the signing key in {self._location}")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _raise_export_error(self._location)

    def private_bytes(
        self,
        encoding: Any,
        format: Any,
        encryption_algorithm: Any,
    ) -> bytes:
        _raise_export_error(self._location)

    def __copy__(self) -> HardwareECKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> HardwareECKey:
        return self

    def __repr__(self) -> str:
        return f"<HardwareECKey {self.curve.name} {self.backend} {self.uri}>"


class HardwareEd25519Key(_SignerHolder, HardwareKey, ed25519.Ed25519PrivateKey):
    """An Ed25519 private key held by a backend; ``sign()`` is pure EdDSA (RFC 8032)."""

    def __init__(
        self,
        signer: Signer,
        public_key: ed25519.Ed25519PublicKey,
        *,
        uri: str,
        backend: str,
        hardware_backed: bool,
    ) -> None:
        self._signer = signer
        self._public_key = public_key
        self.uri = uri
        self.backend = backend
        self.hardware_backed = hardware_backed

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._public_key

    def sign(self, data: Data) -> bytes:
        signature = self._signer.sign_eddsa(bytes(data))
        if len(signature) != 64:
            raise KeyStoreError(
                f"{self._signer.location} returned a {len(signature)}-byte Ed25519 signature; "
                "expected 64 bytes"
            )
        return signature

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        _raise_export_error(self._signer.location)

    def private_bytes_raw(self) -> bytes:
        _raise_export_error(self._signer.location)

    def __copy__(self) -> HardwareEd25519Key:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> HardwareEd25519Key:
        return self

    def __repr__(self) -> str:
        return f"<HardwareEd25519Key {self.backend} {self.uri}>"


class HardwareRSAKey(_SignerHolder, HardwareKey, rsa.RSAPrivateKey):
    """An RSA private key held by a backend; signs with PSS or PKCS #1 v1.5, never decrypts."""

    def __init__(
        self,
        signer: Signer,
        public_key: rsa.RSAPublicKey,
        *,
        uri: str,
        backend: str,
        hardware_backed: bool,
    ) -> None:
        self._signer = signer
        self._public_key = public_key
        self.uri = uri
        self.backend = backend
        self.hardware_backed = hardware_backed

    @property
    def key_size(self) -> int:
        return self._public_key.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public_key

    def sign(
        self,
        data: Data,
        padding: padding.AsymmetricPadding,
        algorithm: hashes.HashAlgorithm | Prehashed | NoDigestInfo,
    ) -> bytes:
        if isinstance(algorithm, NoDigestInfo):
            raise UnsupportedAlgorithm("RSA signing without DigestInfo is not supported")
        digest = digest_message(data, algorithm)
        hash_algorithm: hashes.HashAlgorithm = (
            _hash_for_size(algorithm.digest_size) if isinstance(algorithm, Prehashed) else algorithm
        )
        salt_length = self._salt_length(padding, hash_algorithm)
        return self._signer.sign_rsa_digest(digest, hash_algorithm, padding, salt_length)

    def _salt_length(
        self, pad: padding.AsymmetricPadding, algorithm: hashes.HashAlgorithm
    ) -> int | None:
        if isinstance(pad, padding.PKCS1v15):
            return None
        if not isinstance(pad, padding.PSS):
            raise UnsupportedAlgorithm(f"RSA padding {pad.name} is not supported; use PSS")
        mgf = pad.mgf
        if not isinstance(mgf, padding.MGF1) or mgf._algorithm.name != algorithm.name:
            raise UnsupportedAlgorithm("PSS is supported only with MGF1 over the message hash")

        # EMSA-PSS (RFC 8017, 9.1.1): emLen = ceil((modBits - 1) / 8), max salt = emLen - hLen - 2.
        max_salt = (self.key_size - 1 + 7) // 8 - algorithm.digest_size - 2
        salt = pad._salt_length
        if salt is padding.PSS.MAX_LENGTH or salt is padding.PSS.AUTO:
            return max_salt
        if salt is padding.PSS.DIGEST_LENGTH:
            return algorithm.digest_size
        if isinstance(salt, int) and 0 <= salt <= max_salt:
            return salt
        raise ValueError(f"PSS salt length {salt!r} is out of range 0..{max_salt}")

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise UnsupportedAlgorithm(
            f"the RSA key in {self._signer.location} is a signing key; decryption is not offered"
        )

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _raise_export_error(self._signer.location)

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        _raise_export_error(self._signer.location)

    def __copy__(self) -> HardwareRSAKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> HardwareRSAKey:
        return self

    def __repr__(self) -> str:
        return f"<HardwareRSAKey {self.key_size} {self.backend} {self.uri}>"


AnyHardwareKey = HardwareECKey | HardwareEd25519Key | HardwareRSAKey


def hardware_key_for(
    signer: Signer,
    public_key: PublicKey,
    *,
    uri: str,
    backend: str,
    hardware_backed: bool,
) -> AnyHardwareKey:
    """Build the key class that matches ``public_key``'s type around ``signer``."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return HardwareECKey(
            signer, public_key, uri=uri, backend=backend, hardware_backed=hardware_backed
        )
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return HardwareEd25519Key(
            signer, public_key, uri=uri, backend=backend, hardware_backed=hardware_backed
        )
    if isinstance(public_key, rsa.RSAPublicKey):
        return HardwareRSAKey(
            signer, public_key, uri=uri, backend=backend, hardware_backed=hardware_backed
        )
    raise KeyStoreError(f"unsupported public key type {type(public_key).__name__}")
