"""The device assertion: a compact JWS over a challenge, signed by the device key.

Signing goes through PyJWT with the key object itself, so a hardware key (a ``cryptography``
private key whose ``sign()`` runs in the token) works unchanged and never exports anything.
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from device_sdk.auth.challenge import Challenge, ServerClock
from device_sdk.auth.encoding import b64url_encode
from device_sdk.errors import ProtocolError
from device_sdk.keys.base import compute_device_id

ASSERTION_TYPE = "device-assertion+jwt"
"""The ``typ`` header of every assertion; a verifier rejects any other."""

MAX_ASSERTION_LIFETIME = 60
"""Seconds from ``iat`` to ``exp`` at most."""

JTI_BYTES = 16

TLS_SCHEMES = frozenset({"https", "mqtts", "wss"})
"""Audience URL schemes that run over TLS, and so carry a ``cb`` channel binding."""

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384"}
MIN_RSA_BITS = 2048


def algorithm_for_key(key: PrivateKey) -> str:
    """Return the JWS ``alg`` for a private key: ES256, ES384, EdDSA or PS256.

    Raises :class:`ProtocolError` for a curve or key size the protocol does not allow.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        name = key.curve.name
        if name not in _EC_ALGORITHMS:
            raise ProtocolError(f"unsupported key: curve {name}; use P-256 or P-384")
        return _EC_ALGORITHMS[name]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ProtocolError(
                f"unsupported key: RSA-{key.key_size}; use at least {MIN_RSA_BITS} bits"
            )
        return "PS256"
    raise ProtocolError(f"unsupported key type {type(key).__name__}; use EC, Ed25519 or RSA")


def device_id_of(key: PrivateKey) -> str:
    """Return the device id of a key: its own ``device_id`` or one computed from the public key."""
    device_id = getattr(key, "device_id", None)
    if isinstance(device_id, str):
        return device_id
    return compute_device_id(key.public_key())


def is_tls_audience(audience: str) -> bool:
    """Tell whether an audience URL runs over TLS, so its assertions carry ``cb``."""
    return urlsplit(audience).scheme.lower() in TLS_SCHEMES


def new_jti() -> str:
    """Return a fresh assertion id: 16 random bytes, unpadded base64url."""
    return b64url_encode(secrets.token_bytes(JTI_BYTES))


def sign_assertion(key: PrivateKey, claims: dict[str, Any], *, device_id: str) -> str:
    """Sign ``claims`` as a compact JWS with the assertion header (``typ``, ``alg``, ``kid``)."""
    algorithm = algorithm_for_key(key)
    headers = {"typ": ASSERTION_TYPE, "kid": device_id}
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def build_assertion(
    key: PrivateKey,
    challenge: Challenge,
    *,
    channel_binding: bytes | None,
    htm: str | None = None,
    htu: str | None = None,
    clock: ServerClock | None = None,
    lifetime: int = MAX_ASSERTION_LIFETIME,
) -> str:
    """Sign an assertion in response to ``challenge``.

    ``channel_binding`` is the ``tls-server-end-point`` value of the certificate the device saw
    (:func:`~device_sdk.auth.channel_binding.tls_server_end_point`); it is required for a TLS
    audience and must be None otherwise. ``clock`` gives server time; by default it is anchored on
    the challenge now, so call this right after the challenge arrives or pass the clock made then.
    ``htm`` and ``htu`` are for HTTP login: the method and URL of the token request.
    """
    device_id = device_id_of(key)
    if challenge.device_id != device_id:
        raise ProtocolError(
            f"challenge was issued to device {challenge.device_id}, not to this key's {device_id}"
        )
    if not 0 < lifetime <= MAX_ASSERTION_LIFETIME:
        raise ProtocolError(
            f"assertion lifetime {lifetime} s is outside 1..{MAX_ASSERTION_LIFETIME} s"
        )
    _check_channel_binding(challenge.audience, channel_binding)
    if (htm is None) != (htu is None):
        raise ProtocolError("htm and htu go together: pass both for HTTP login, or neither")

    if clock is None:
        clock = ServerClock.from_challenge(challenge)
    iat = clock.now()
    claims: dict[str, Any] = {
        "iss": device_id,
        "sub": device_id,
        "aud": challenge.audience,
        "iat": iat,
        "exp": iat + lifetime,
        "jti": new_jti(),
        "nonce": challenge.nonce,
    }
    if channel_binding is not None:
        claims["cb"] = b64url_encode(channel_binding)
    if htm is not None and htu is not None:
        claims["htm"] = htm
        claims["htu"] = htu
    return sign_assertion(key, claims, device_id=device_id)


def _check_channel_binding(audience: str, channel_binding: bytes | None) -> None:
    tls = is_tls_audience(audience)
    if tls and not channel_binding:
        raise ProtocolError(
            f"audience {audience} runs over TLS, so the assertion needs the channel binding of the "
            "server certificate; pass tls_server_end_point(certificate)"
        )
    if not tls and channel_binding is not None:
        raise ProtocolError(
            f"audience {audience} is not a TLS URL, so it has no channel binding; pass None"
        )
