"""Strict parsing of a compact JWS, before any key or signature is looked at.

Each part must be canonical unpadded base64url, the header and payload JSON objects without
duplicate keys, and the whole token at most :data:`MAX_ASSERTION_BYTES` long. Every failure is a
:class:`~device_sdk.errors.VerificationError` with reason ``malformed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from device_sdk.auth.encoding import b64url_decode, loads_json_object
from device_sdk.errors import ProtocolError, VerificationError

MAX_ASSERTION_BYTES = 8192
"""Longest assertion accepted; a PS256 assertion with a 4096-bit key is about 1.2 KiB."""


@dataclass(frozen=True)
class CompactJWS:
    """The decoded parts of a compact JWS."""

    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes


def parse_compact_jws(token: str, max_bytes: int = MAX_ASSERTION_BYTES) -> CompactJWS:
    """Split and decode a compact JWS strictly; raise ``malformed`` on anything unexpected."""
    if not isinstance(token, str):
        raise VerificationError("malformed", f"assertion is a {type(token).__name__}, not a string")
    if len(token) > max_bytes:
        raise VerificationError("malformed", f"assertion of {len(token)} characters > {max_bytes}")
    parts = token.split(".")
    if len(parts) != 3:
        raise VerificationError("malformed", f"{len(parts)} dot-separated parts, expected 3")
    header_text, payload_text, signature_text = parts
    if not header_text or not payload_text:
        raise VerificationError("malformed", "empty header or payload")

    try:
        header = loads_json_object(b64url_decode(header_text))
        payload = loads_json_object(b64url_decode(payload_text))
        signature = b64url_decode(signature_text)
    except ProtocolError as exc:
        raise VerificationError("malformed", str(exc)) from None

    # The regular expression in b64url_decode let only ASCII through, so this cannot fail.
    signing_input = f"{header_text}.{payload_text}".encode("ascii")
    return CompactJWS(header, payload, signing_input, signature)
