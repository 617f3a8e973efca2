"""The verifier's own signing key and the access tokens it signs.

Access tokens are ES256 JWTs with ``typ`` ``at+jwt`` (RFC 9068). The public key is published as
a JWKS whose ``kid`` is the RFC 7638 thumbprint of the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_sdk.auth.encoding import b64url_encode
from device_sdk.errors import ConfigError, VerificationError

logger = logging.getLogger(__name__)

ACCESS_TOKEN_TYPE = "at+jwt"  # noqa: S105 (a media type, not a secret)
ACCESS_TOKEN_ALGORITHM = "ES256"  # noqa: S105 (an algorithm name)


def load_or_create_signing_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """Load the verifier's P-256 signing key from a PEM file, creating it (mode 0600) if absent.

    Raises :class:`ConfigError` when the file is readable by group or others, or is not a P-256
    private key.
    """
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load_signing_key(path)

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    logger.info("created verifier signing key %s", path)
    return key


def _load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"verifier signing key {path} has mode {mode:04o}; restrict it with chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError:
        raise ConfigError(f"verifier signing key {path} is not an unencrypted PEM key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(
            f"verifier signing key {path} is not a P-256 key; delete it to regenerate"
        )
    return key


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """Return the public JWK of a P-256 key with ``kid`` (RFC 7638 thumbprint), ``alg``, ``use``."""
    numbers = public_key.public_numbers()
    jwk = {
        "crv": "P-256",
        "kty": "EC",
        "x": b64url_encode(numbers.x.to_bytes(32, "big")),
        "y": b64url_encode(numbers.y.to_bytes(32, "big")),
    }
    # The thumbprint hashes the required members in lexicographic order, without whitespace.
    canonical = json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode("ascii")
    jwk["kid"] = b64url_encode(hashlib.sha256(canonical).digest())
    jwk["alg"] = ACCESS_TOKEN_ALGORITHM
    jwk["use"] = "sig"
    return jwk


def sign_access_token(key: ec.EllipticCurvePrivateKey, kid: str, claims: dict[str, Any]) -> str:
    """Sign access-token claims as an ES256 JWT with ``typ`` ``at+jwt``."""
    headers = {"typ": ACCESS_TOKEN_TYPE, "kid": kid}
    return jwt.encode(claims, key, algorithm=ACCESS_TOKEN_ALGORITHM, headers=headers)


def decode_access_token(
    token: str,
    public_key: ec.EllipticCurvePublicKey,
    *,
    kid: str,
    issuer: str,
    leeway: int,
    max_length: int,
) -> dict[str, Any]:
    """Check an access token's header, signature, issuer, audience and times; return its claims.

    Raises :class:`VerificationError` with ``malformed``, ``bad_type`` (not an ``at+jwt`` with
    this ``kid``), ``bad_signature``, ``expired`` or ``wrong_audience``.
    """
    if not isinstance(token, str) or len(token) > max_length:
        raise VerificationError(
            "malformed", f"access token is not a string of at most {max_length}"
        )
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise VerificationError("malformed", "access token header does not parse") from None
    if header.get("typ") != ACCESS_TOKEN_TYPE or header.get("kid") != kid:
        raise VerificationError("bad_type", "not an access token of this verifier")

    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            public_key,
            algorithms=[ACCESS_TOKEN_ALGORITHM],
            audience=issuer,
            issuer=issuer,
            leeway=leeway,
            options={"require": ["exp", "iat", "sub", "jti"]},
        )
    except jwt.ExpiredSignatureError:
        raise VerificationError("expired", "access token expired") from None
    except jwt.InvalidAudienceError:
        raise VerificationError("wrong_audience", "access token audience") from None
    except jwt.InvalidSignatureError:
        raise VerificationError("bad_signature", "access token signature") from None
    except jwt.InvalidTokenError as exc:
        raise VerificationError("malformed", f"access token: {type(exc).__name__}") from None
    return claims
