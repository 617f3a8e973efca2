"""``tls-server-end-point`` channel binding (RFC 5929, section 4.1).

The value is a hash of the server certificate the client saw in the TLS handshake. A proxy that
terminates TLS with its own certificate makes the device sign a different value, which the real
server rejects.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes

from device_sdk.errors import ProtocolError

# RFC 5929 replaces MD5 and SHA-1 by SHA-256.
_UPGRADED_TO_SHA256 = (hashes.MD5, hashes.SHA1)


def end_point_hash(certificate: x509.Certificate) -> hashes.HashAlgorithm:
    """Return the hash RFC 5929 prescribes for a certificate.

    That is the hash of the certificate's signature algorithm, with SHA-256 in place of MD5 and
    SHA-1. Ed25519 and Ed448 signatures have no separate hash and RFC 5929 defines none for them,
    so this module uses SHA-256. Device and verifier both compute it here, so they agree. Other
    software may not: OpenSSL maps Ed25519 to no digest, and PostgreSQL then rejects the binding.
    """
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, _UPGRADED_TO_SHA256):
        return hashes.SHA256()
    return algorithm


def tls_server_end_point(der_certificate: bytes) -> bytes:
    """Return the ``tls-server-end-point`` channel binding of a DER server certificate.

    Raises :class:`ProtocolError` when the bytes are not a DER X.509 certificate.
    """
    try:
        certificate = x509.load_der_x509_certificate(der_certificate)
    except ValueError as exc:
        raise ProtocolError(f"invalid server certificate for channel binding: {exc}") from None
    try:
        algorithm = end_point_hash(certificate)
    except UnsupportedAlgorithm as exc:
        raise ProtocolError(f"unsupported certificate signature algorithm: {exc}") from None

    digest = hashes.Hash(algorithm)
    digest.update(der_certificate)
    return digest.finalize()
