"""Strict parsing of a compact JWS, before any key or signature is looked at.

Each part must be canonical unpadded base64url, the header and payload JSON objects without
duplicate keys, and the whole token at most :data:`MAX_ASSERTION_BYTES` long. Every failure is a
:class:`~device_sdk.errors.VerificationError` with reason ``malformed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from device_sdk.auth.encoding import b64url_decode, loads_json_object
from device_sdk.errors import ProtocolError, VerificationError

MAX_ASSERTION_BYTES = 8192
"""Maximum assertion length in characters; a PS256 assertion with a 4096-bit key has about 1200."""

# A device sends the same header text with every assertion, so decoded headers are kept by
# their exact text. Entries are read-only and were checked as strictly as a fresh parse.
_HEADER_CACHE: dict[str, Mapping[str, Any]] = {}
_HEADER_CACHE_SIZE = 4096


# A NamedTuple and not a frozen dataclass: it is built once per verification, in a third of the
# time.
class CompactJWS(NamedTuple):
    """The decoded parts of a compact JWS, and the header's base64url text."""

    header: Mapping[str, Any]
    header_text: str
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
        header = _HEADER_CACHE.get(header_text)
        if header is None:
            header = MappingProxyType(loads_json_object(b64url_decode(header_text)))
            if len(_HEADER_CACHE) >= _HEADER_CACHE_SIZE:
                _HEADER_CACHE.clear()
            _HEADER_CACHE[header_text] = header
        payload = loads_json_object(b64url_decode(payload_text))
        signature = b64url_decode(signature_text)
    except ProtocolError as exc:
        raise VerificationError("malformed", str(exc)) from None

    # b64url_decode accepted both parts, and it accepts only ASCII, so this encode cannot fail.
    signing_input = f"{header_text}.{payload_text}".encode("ascii")
    return CompactJWS(header, header_text, payload, signing_input, signature)
