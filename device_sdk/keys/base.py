"""What every hardware key offers, whichever backend holds it.

A backend's key object is a ``cryptography`` private key (``ec.EllipticCurvePrivateKey``,
``ed25519.Ed25519PrivateKey`` or ``rsa.RSAPrivateKey``) whose ``sign()`` runs in the hardware, and
also a :class:`HardwareKey`, which adds identity and provenance.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


def compute_device_id(public_key: PublicKey) -> str:
    """Return the device id: unpadded base64url of SHA-256 over the DER SubjectPublicKeyInfo.

    The device and the verifier compute it the same way, so it is stable across backends.
    """
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(spki).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class HardwareKey:
    """Identity and provenance of a key held by a backend.

    ``uri`` never contains a PIN; ``hardware_backed`` is False for SoftHSM and software keys.
    """

    uri: str
    backend: str
    hardware_backed: bool

    @property
    def device_id(self) -> str:
        return compute_device_id(self.public_key())  # type: ignore[attr-defined, no-any-return]

    def attestation(self) -> Any | None:
        """Return evidence that the key lives in the hardware, or None where none exists."""
        return None
