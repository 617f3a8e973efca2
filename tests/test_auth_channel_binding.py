"""tls-server-end-point channel binding (RFC 5929) on certificates made here."""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from device_sdk.auth import tls_server_end_point
from device_sdk.errors import ProtocolError

NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "verifier.test")])


def certificate(key: Any, algorithm: hashes.HashAlgorithm | None, **sign_options: Any) -> bytes:
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    return builder.sign(key, algorithm, **sign_options).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(
    ("algorithm", "hash_name"),
    [(hashes.SHA256(), "sha256"), (hashes.SHA384(), "sha384"), (hashes.SHA512(), "sha512")],
)
def test_ecdsa_certificate_uses_its_hash(
    ec_key: ec.EllipticCurvePrivateKey, algorithm: hashes.HashAlgorithm, hash_name: str
) -> None:
    der = certificate(ec_key, algorithm)
    assert tls_server_end_point(der) == hashlib.new(hash_name, der).digest()


# DER of the AlgorithmIdentifier OIDs sha256WithRSAEncryption, sha1WithRSAEncryption and
# md5WithRSAEncryption (RFC 8017, appendix C): all three are 11 bytes long.
SHA256_WITH_RSA = bytes.fromhex("06092a864886f70d01010b")
WEAK_WITH_RSA = {
    "sha1": bytes.fromhex("06092a864886f70d010105"),
    "md5": bytes.fromhex("06092a864886f70d010104"),
}


def weak_rsa_certificate(key: rsa.RSAPrivateKey, hash_name: str) -> bytes:
    """Return a certificate signed with SHA-1 or MD5, which cryptography refuses to build.

    The SHA-256 certificate's algorithm identifiers are swapped for the weak one's (same
    length), and the TBS part is signed again with the weak hash.
    """
    der = certificate(key, hashes.SHA256())
    assert der.count(SHA256_WITH_RSA) == 2
    der = der.replace(SHA256_WITH_RSA, WEAK_WITH_RSA[hash_name])
    weak_hash = hashes.SHA1() if hash_name == "sha1" else hashes.MD5()
    tbs = x509.load_der_x509_certificate(der).tbs_certificate_bytes
    signature = key.sign(tbs, padding.PKCS1v15(), weak_hash)
    return der[: -len(signature)] + signature


@pytest.mark.parametrize("hash_name", ["sha1", "md5"])
def test_weak_hash_certificate_uses_sha256(rsa_key: rsa.RSAPrivateKey, hash_name: str) -> None:
    der = weak_rsa_certificate(rsa_key, hash_name)
    parsed = x509.load_der_x509_certificate(der)
    assert parsed.signature_hash_algorithm is not None
    assert parsed.signature_hash_algorithm.name == hash_name
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


def test_rsa_pss_certificate_uses_pss_hash(rsa_key: rsa.RSAPrivateKey) -> None:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    der = certificate(rsa_key, hashes.SHA384(), rsa_padding=pss)
    assert tls_server_end_point(der) == hashlib.sha384(der).digest()


def test_ed25519_certificate_uses_sha256() -> None:
    der = certificate(ed25519.Ed25519PrivateKey.generate(), None)
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


def test_different_certificates_differ(ec_key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    assert tls_server_end_point(certificate(ec_key, hashes.SHA256())) != tls_server_end_point(
        certificate(other, hashes.SHA256())
    )


def test_not_a_certificate_rejected() -> None:
    with pytest.raises(ProtocolError, match="invalid server certificate"):
        tls_server_end_point(b"\x30\x03\x02\x01\x01")
