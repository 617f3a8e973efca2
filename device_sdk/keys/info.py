"""Describe an opened key: the fields that ``device-sdk keys info`` prints."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from device_sdk.keys.base import HardwareKey, PublicKey

__all__ = ["algorithm_name", "key_info"]

_CURVE_NAMES = {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}


def algorithm_name(public_key: PublicKey) -> str:
    """Return the SDK's algorithm name for a public key: ec-p256, ec-p384, ed25519, rsa-2048 ..."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return _CURVE_NAMES.get(public_key.curve.name, f"ec-{public_key.curve.name}")
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa-{public_key.key_size}"
    raise TypeError(f"unsupported public key type {type(public_key).__name__}")


def key_info(key: HardwareKey) -> dict[str, Any]:
    """Return device_id, algorithm, backend, hardware_backed, the key's protection and its PEM.

    ``never_extractable`` and ``always_sensitive`` are read from the token for PKCS#11 keys and
    are None for backends that have no such attributes.
    """
    public_key: PublicKey = key.public_key()  # type: ignore[attr-defined]
    policy: dict[str, bool | None] = {"never_extractable": None, "always_sensitive": None}
    if key.backend in ("pkcs11", "softhsm"):
        from device_sdk.keys.pkcs11 import key_policy

        policy = key_policy(key)  # type: ignore[arg-type]
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "uri": key.uri,
        "device_id": key.device_id,
        "algorithm": algorithm_name(public_key),
        "backend": key.backend,
        "hardware_backed": key.hardware_backed,
        "never_extractable": policy["never_extractable"],
        "always_sensitive": policy["always_sensitive"],
        "public_key_pem": pem.decode("ascii"),
    }
