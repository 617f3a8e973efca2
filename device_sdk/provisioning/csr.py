"""The certificate signing request that enrollment sends, signed inside the token."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from device_sdk.errors import ProvisioningError

DEVICE_URN_PREFIX = "urn:device-sdk:device:"

SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def device_urn(device_id: str) -> str:
    """Return the URI that names a device in a certificate's subjectAltName."""
    return DEVICE_URN_PREFIX + device_id


def build_csr(key: SigningKey, device_id: str) -> str:
    """Build a PEM CSR for ``key`` with the device_id as subject CN and as a SAN URI.

    ``key.sign`` runs in the key's backend, so the private key never leaves it. RSA keys sign
    with PSS, the only RSA scheme the login protocol uses.
    """
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_urn(device_id))]),
            critical=False,
        )
    )

    try:
        if isinstance(key, ed25519.Ed25519PrivateKey):
            csr = builder.sign(key, None)
        elif isinstance(key, rsa.RSAPrivateKey):
            csr = builder.sign(
                key,
                hashes.SHA256(),
                rsa_padding=padding.PSS(
                    mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH
                ),
            )
        elif isinstance(key.curve, ec.SECP384R1):
            csr = builder.sign(key, hashes.SHA384())
        else:
            csr = builder.sign(key, hashes.SHA256())
    except (TypeError, ValueError) as exc:
        raise ProvisioningError(
            f"signing the CSR with the device key failed: {exc}", step="csr"
        ) from exc

    if not csr.is_signature_valid:
        raise ProvisioningError(
            "the CSR signature made by the device key does not verify; the token returned a "
            "bad signature",
            step="csr",
        )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def algorithm_name(key: SigningKey) -> str:
    """Return the config's name for a key's algorithm (``ec-p256``, ``rsa-pss-2048``, ...)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-pss-{key.key_size}"
    curves = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}
    try:
        return curves[key.curve.name]
    except KeyError:
        raise ProvisioningError(
            f"unsupported curve {key.curve.name}; use P-256 or P-384", step="key"
        ) from None
