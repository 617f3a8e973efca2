"""Key URIs: RFC 7512 ``pkcs11:`` URIs, and the SDK's own ``tpm2:`` and ``serial:`` schemes.

API for the key backends::

    uri = Pkcs11URI.parse("pkcs11:token=edge;object=device;type=private"
                          "?pin-source=file:/etc/device-sdk/pin")
    uri.token, uri.object, uri.type, uri.id (bytes), uri.slot_id (int), uri.serial, ...
    uri.require_recognized_path_attributes()  # URIError if a vendor path attribute is present
    read_pin(uri) -> str | None               # pin-value, or the PIN read from pin-source
    read_pin_source("env:DEVICE_PIN") -> str  # the same for a pin-source held elsewhere
    read_secret_file("/path", "enrollment token") -> str  # the same checks for another secret
    resolve_module(uri) -> str | None         # module-path, or module-name found on disk
    str(uri), repr(uri)                       # canonical form with pin-value=REDACTED
    uri.format_unredacted()                   # canonical form with the PIN: internal use only
    uri.with_attributes(object="k2", pin_value=None)   # a changed, validated copy

    Tpm2URI.parse("tpm2:handle=0x81000010?tcti=swtpm:host=127.0.0.1,port=2321")
    SerialURI.parse("serial:/dev/ttyACM0?baud=115200&slot=0")
    parse_key_uri(text) -> Pkcs11URI | Tpm2URI | SerialURI

Every parse failure raises :class:`~device_sdk.errors.URIError` naming the attribute and its
value. A ``pin-value`` is never shown in a message, a ``str()`` or a ``repr()``.

``pkcs11:`` URIs follow RFC 7512:

- The path (before ``?``) contains ``;``-separated attributes that select a token, slot,
  library or object. The query (after ``?``) contains ``&``-separated attributes that tell the
  consumer how to use it: ``module-path``, ``module-name``, ``pin-source`` and ``pin-value``.
- Values are percent-decoded into bytes. ``id`` stays bytes, every other value must be UTF-8.
  Formatting percent-encodes every byte outside the characters that RFC 7512 allows unencoded in
  that component, and encodes every byte of ``id``.
- A standard attribute, or a vendor attribute in the path, may appear only once. RFC 7512 lets a
  vendor attribute repeat in the query, so those are kept in order.
- Vendor attributes, named with letters, digits, ``-`` and ``_`` (the old ``x-`` prefix
  included), are kept and written back. Those whose name contains ``pin-value``, ``password`` or
  ``secret`` are redacted like ``pin-value``. RFC 7512 says that an unrecognized path
  attribute should make the URI match no object, so a backend calls
  :meth:`Pkcs11URI.require_recognized_path_attributes` before it looks a key up. Unrecognized
  query attributes are ignored, as RFC 7512 says, but still kept for formatting.
  NOTE: these two rules follow RFC 7512 section 2.5 as remembered. Only the grammar of section
  2.3 was checked against the RFC's ABNF.
- A standard name in the wrong component (``pin-value`` in the path, ``token`` in the query) and a
  standard name in other letter case (``Token``) are rejected rather than read as vendor
  attributes, so a misplaced PIN never ends up in an unredacted vendor attribute.

``pin-source`` forms that :func:`read_pin` reads: ``file:/path``, ``file:///path``,
``file://localhost/path``, a plain absolute ``/path``, and ``env:NAME``. The ``env:`` form is an
extension of this SDK, not part of RFC 7512. A PIN file must be a regular file owned by the
current user with no group or other permissions (mode 0600 or 0400); one trailing newline is
removed. Commands (``|/bin/cmd``) are not supported.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pwd
import re
import stat
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypedDict

from device_sdk.errors import ConfigError, URIError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "MODULE_SEARCH_DIRS",
    "OBJECT_TYPES",
    "Pkcs11URI",
    "SerialURI",
    "Tpm2URI",
    "find_module",
    "parse_key_uri",
    "parse_pin_source",
    "read_pin",
    "read_pin_source",
    "read_secret_file",
    "resolve_module",
]

logger = logging.getLogger(__name__)

REDACTED: Final = "REDACTED"

OBJECT_TYPES: Final = frozenset({"private", "public", "cert", "secret-key", "data"})

# CK_SLOT_ID is a CK_ULONG: 64 bits on 64-bit Linux, 32 bits on armhf. The parser accepts the
# wider range and leaves a slot the platform cannot name to the token lookup.
MAX_SLOT_ID: Final = 2**64 - 1

# The library-version attribute maps to CK_VERSION, whose major and minor are CK_BYTEs.
MAX_VERSION_PART: Final = 255

# Directories searched for a module-name, in order: p11-kit module directories first, then the
# SoftHSM directories of Debian, Raspberry Pi OS (arm64 and armhf), Fedora and Homebrew, then the
# plain library directories.
MODULE_SEARCH_DIRS: Final = (
    "/usr/lib/x86_64-linux-gnu/pkcs11",
    "/usr/lib/aarch64-linux-gnu/pkcs11",
    "/usr/lib/arm-linux-gnueabihf/pkcs11",
    "/usr/lib64/pkcs11",
    "/usr/lib/pkcs11",
    "/usr/local/lib/pkcs11",
    "/usr/lib/softhsm",
    "/usr/lib/x86_64-linux-gnu/softhsm",
    "/usr/lib/aarch64-linux-gnu/softhsm",
    "/usr/lib/arm-linux-gnueabihf/softhsm",
    "/usr/lib64/softhsm",
    "/usr/local/lib/softhsm",
    "/opt/homebrew/lib/softhsm",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/arm-linux-gnueabihf",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/opt/homebrew/lib",
)

# A PIN file contains one PIN, so anything this large is the wrong file.
MAX_PIN_FILE_BYTES: Final = 4096

# Characters left unencoded when formatting (RFC 7512 pk11-pchar and pk11-qchar without
# pct-encoded). When parsing, the query also accepts ";", which RFC 3986 allows there.
_UNRESERVED: Final = frozenset(string.ascii_letters + string.digits + "-._~")
_PATH_SAFE: Final = _UNRESERVED | frozenset(":[]@!$'()*+,=&")
_QUERY_SAFE: Final = _UNRESERVED | frozenset(":[]@!$'()*+,=/?|")
_QUERY_ACCEPTED: Final = _QUERY_SAFE | frozenset(";")
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")
_NAME_CHARS: Final = frozenset(string.ascii_letters + string.digits + "-_")

_DIGITS_RE: Final = re.compile(r"[0-9]+", re.ASCII)
_VERSION_RE: Final = re.compile(r"([0-9]+)(?:\.([0-9]+))?", re.ASCII)
_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_SCHEME_RE: Final = re.compile(r"[a-z][a-z0-9+.-]{0,19}", re.ASCII)

# (attribute name, field name), in the order the canonical form writes them.
_PATH_ATTRIBUTES: Final = (
    ("token", "token"),
    ("manufacturer", "manufacturer"),
    ("model", "model"),
    ("serial", "serial"),
    ("object", "object"),
    ("type", "type"),
    ("id", "id"),
    ("slot-id", "slot_id"),
    ("slot-description", "slot_description"),
    ("slot-manufacturer", "slot_manufacturer"),
    ("library-manufacturer", "library_manufacturer"),
    ("library-description", "library_description"),
    ("library-version", "library_version"),
)
_QUERY_ATTRIBUTES: Final = (
    ("pin-source", "pin_source"),
    ("pin-value", "pin_value"),
    ("module-name", "module_name"),
    ("module-path", "module_path"),
)
_PATH_FIELDS: Final = dict(_PATH_ATTRIBUTES)
_QUERY_FIELDS: Final = dict(_QUERY_ATTRIBUTES)
_STANDARD_NAMES: Final = frozenset(_PATH_FIELDS) | frozenset(_QUERY_FIELDS)
_TEXT_FIELDS: Final = (
    "token",
    "manufacturer",
    "model",
    "serial",
    "object",
    "slot_description",
    "slot_manufacturer",
    "library_manufacturer",
    "library_description",
    "module_name",
    "module_path",
    "pin_source",
    "pin_value",
)
# Vendor attributes whose name contains one of these (such as x-pin-value, from drafts of
# RFC 7512) are treated like pin-value: redacted in str() and repr() and never quoted in errors.
_SECRET_NAME_PARTS: Final = ("pin-value", "password", "secret")


def _is_secret(attribute: str) -> bool:
    lowered = attribute.lower()
    return any(part in lowered for part in _SECRET_NAME_PARTS)


# --- percent-encoding -----------------------------------------------------------------------


# Longer values are cut in error messages, so a hostile URI cannot flood a log.
MAX_SHOWN_VALUE: Final = 80


def _describe(attribute: str, raw: str) -> str:
    """Name an attribute and its value for an error message, hiding secret values."""
    if _is_secret(attribute):
        return f"attribute {attribute!r} (value not shown)"
    if len(raw) > MAX_SHOWN_VALUE:
        return f"attribute {attribute!r} value {raw[:MAX_SHOWN_VALUE]!r}... ({len(raw)} characters)"
    return f"attribute {attribute!r} value {raw!r}"


def _parse_decimal(text: str, attribute: str, raw: str, maximum: int) -> int:
    """Parse a decimal number of at most ``maximum``; ``raw`` is the value as written."""
    if not _DIGITS_RE.fullmatch(text):
        raise URIError(f"invalid {_describe(attribute, raw)}: {attribute} is a decimal number")

    # The length check keeps int() away from huge digit strings, which it would reject with a
    # ValueError (Python limits int() to 4300 digits) or parse slowly.
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(maximum)) or int(digits) > maximum:
        raise URIError(f"invalid {_describe(attribute, raw)}: {attribute} is at most {maximum}")
    return int(digits)


def _percent_decode(raw: str, attribute: str, accepted: frozenset[str]) -> bytes:
    """Decode ``%XX`` escapes into bytes, rejecting characters the component does not accept."""
    decoded = bytearray()
    index = 0
    while index < len(raw):
        char = raw[index]

        if char == "%":
            pair = raw[index + 1 : index + 3]
            if len(pair) != 2 or not all(digit in _HEX_DIGITS for digit in pair):
                escape = "" if _is_secret(attribute) else f" {raw[index : index + 3]!r}"
                raise URIError(
                    f"invalid percent escape{escape} in {_describe(attribute, raw)}: "
                    "% must be followed by two hex digits; write a literal % as %25"
                )
            decoded.append(int(pair, 16))
            index += 3
            continue

        if char not in accepted:
            character = "a character" if _is_secret(attribute) else repr(char)
            raise URIError(
                f"{character} in {_describe(attribute, raw)} must be percent-encoded "
                "(as %XX for each UTF-8 byte)"
            )
        decoded.append(ord(char))
        index += 1
    return bytes(decoded)


def _decode_text(raw: str, attribute: str, accepted: frozenset[str]) -> str:
    data = _percent_decode(raw, attribute, accepted)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise URIError(
            f"{_describe(attribute, raw)} is not valid UTF-8 after percent-decoding; "
            "only id may hold arbitrary bytes"
        ) from None


def _percent_encode(data: bytes, safe: frozenset[str]) -> str:
    parts = []
    for byte in data:
        char = chr(byte)
        parts.append(char if char in safe else f"%{byte:02X}")
    return "".join(parts)


def _split_attribute(part: str, component: str) -> tuple[str, str]:
    """Split ``name=value`` and check the name's characters, without echoing a possible PIN."""
    name, equals, raw = part.partition("=")
    if not equals:
        # Not shown: a bare query word may be a PIN typed without "pin-value=".
        raise URIError(f"a {component} attribute has no '=': write name=value")
    if not name:
        raise URIError(f"{component} attribute with an empty name before '='")
    if not all(char in _NAME_CHARS for char in name):
        raise URIError(
            f"invalid {component} attribute name {name!r}: names contain only letters, "
            "digits, '-' and '_'"
        )
    return name, raw


def _check_not_standard_in_other_case(name: str) -> None:
    lowered = name.lower()
    if lowered != name and lowered in _STANDARD_NAMES:
        raise URIError(f"attribute name {name!r} must be written in lower case: {lowered!r}")


# --- pkcs11: --------------------------------------------------------------------------------


class _Pkcs11Changes(TypedDict, total=False):
    token: str | None
    manufacturer: str | None
    model: str | None
    serial: str | None
    object: str | None
    type: str | None
    id: bytes | None
    slot_id: int | None
    slot_description: str | None
    slot_manufacturer: str | None
    library_manufacturer: str | None
    library_description: str | None
    library_version: tuple[int, int] | None
    module_path: str | None
    module_name: str | None
    pin_source: str | None
    pin_value: str | None
    vendor_path: tuple[tuple[str, str], ...]
    vendor_query: tuple[tuple[str, str], ...]


@dataclass(frozen=True, repr=False)
class Pkcs11URI:
    """A parsed RFC 7512 ``pkcs11:`` URI.

    Field names are the attribute names with ``_`` for ``-``. ``None`` means the attribute is
    absent, which differs from an empty value (``serial=`` gives ``""``). ``library_version`` is
    ``(major, minor)``; ``library-version=3`` reads as ``(3, 0)``. ``vendor_path`` and
    ``vendor_query`` hold vendor attributes as ``(name, value)`` pairs in URI order.
    """

    token: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    object: str | None = None
    type: str | None = None
    id: bytes | None = None
    slot_id: int | None = None
    slot_description: str | None = None
    slot_manufacturer: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: tuple[int, int] | None = None
    module_path: str | None = None
    module_name: str | None = None
    pin_source: str | None = None
    pin_value: str | None = None
    vendor_path: tuple[tuple[str, str], ...] = ()
    vendor_query: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        self._check_field_types()
        self._check_field_values()
        self._check_vendor_attributes()

    def _check_field_types(self) -> None:
        for field in _TEXT_FIELDS:
            value = getattr(self, field)
            if value is not None and not isinstance(value, str):
                raise URIError(f"{field} must be a string or None, got {type(value).__name__}")
        if self.id is not None and not isinstance(self.id, bytes):
            if not isinstance(self.id, bytearray | memoryview):
                raise URIError(f"id must be bytes or None, got {type(self.id).__name__}")
            object.__setattr__(self, "id", bytes(self.id))

    def _check_field_values(self) -> None:
        if self.type is not None and self.type not in OBJECT_TYPES:
            raise URIError(
                f"invalid type {self.type!r}: use one of {', '.join(sorted(OBJECT_TYPES))}"
            )

        if self.slot_id is not None:
            if isinstance(self.slot_id, bool) or not isinstance(self.slot_id, int):
                raise URIError(f"slot_id must be an int or None, got {self.slot_id!r}")
            if not 0 <= self.slot_id <= MAX_SLOT_ID:
                raise URIError(
                    f"invalid slot-id {self.slot_id}: a CK_SLOT_ID is between 0 and {MAX_SLOT_ID}"
                )

        if self.library_version is not None:
            _check_library_version(self.library_version)

        if self.module_path is not None and not self.module_path.startswith("/"):
            raise URIError(
                f"invalid module-path {self.module_path!r}: it must be an absolute path, so the "
                "library loaded does not depend on the current directory"
            )
        if self.module_name is not None and ("/" in self.module_name or not self.module_name):
            raise URIError(
                f"invalid module-name {self.module_name!r}: it is a library name such as "
                "'softhsm2' or 'opensc-pkcs11'; give a file with module-path instead"
            )

        # Which of the two would win is not defined, and guessing could lock a token.
        if self.pin_source is not None and self.pin_value is not None:
            raise URIError("pin-source and pin-value are both given; keep only one of them")

    def _check_vendor_attributes(self) -> None:
        seen: set[str] = set()
        for component, pairs in (("path", self.vendor_path), ("query", self.vendor_query)):
            if not isinstance(pairs, tuple):
                raise URIError(f"vendor_{component} must be a tuple of (name, value) pairs")
            for pair in pairs:
                if not (
                    isinstance(pair, tuple)
                    and len(pair) == 2
                    and isinstance(pair[0], str)
                    and isinstance(pair[1], str)
                ):
                    raise URIError(
                        f"vendor_{component} must hold (name, value) string pairs, got {pair!r}"
                    )
                name = pair[0]
                if not name or not all(char in _NAME_CHARS for char in name):
                    raise URIError(
                        f"invalid vendor attribute name {name!r}: names contain only letters, "
                        "digits, '-' and '_'"
                    )
                if name.lower() in _STANDARD_NAMES:
                    raise URIError(
                        f"{name!r} is a standard attribute, not a vendor attribute; "
                        "set its own field instead"
                    )
                if component == "path":
                    if name in seen:
                        raise URIError(f"duplicate path attribute {name!r}")
                    seen.add(name)

    # --- parsing ------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> Pkcs11URI:
        """Parse a ``pkcs11:`` URI, raising URIError that names the attribute and value at fault."""
        if not isinstance(text, str):
            raise URIError(f"a pkcs11: URI must be a string, got {type(text).__name__}")
        scheme, colon, rest = text.partition(":")
        if not colon or scheme.lower() != "pkcs11":
            raise URIError("not a pkcs11: URI: it must start with 'pkcs11:'")
        if "#" in rest:
            raise URIError("a pkcs11: URI has no fragment: percent-encode '#' as %23")

        path, _, query = rest.partition("?")
        fields: dict[str, object] = {}
        fields.update(_parse_path(path))
        fields.update(_parse_query(query))
        return cls(**fields)  # type: ignore[arg-type]

    # --- formatting ---------------------------------------------------------------------------

    def _format(self, *, redact: bool) -> str:
        path_parts = []
        for attribute, field in _PATH_ATTRIBUTES:
            value = getattr(self, field)
            if value is not None:
                path_parts.append(f"{attribute}={_format_path_value(attribute, value)}")
        for name, text in self.vendor_path:
            encoded = REDACTED if redact and _is_secret(name) else _encode_path_text(text)
            path_parts.append(f"{name}={encoded}")

        query_parts = []
        for attribute, field in _QUERY_ATTRIBUTES:
            value = getattr(self, field)
            if value is None:
                continue
            query_parts.append(f"{attribute}={_format_query_value(attribute, value, redact)}")
        for name, text in self.vendor_query:
            query_parts.append(f"{name}={_format_query_value(name, text, redact)}")

        result = "pkcs11:" + ";".join(path_parts)
        if query_parts:
            result += "?" + "&".join(query_parts)
        return result

    def __str__(self) -> str:
        return self._format(redact=True)

    def __repr__(self) -> str:
        return f"Pkcs11URI({self._format(redact=True)!r})"

    def format_unredacted(self) -> str:
        """Return the canonical form including the real ``pin-value``.

        Use it only to hand the URI to code that needs the PIN, and never log or print it.
        """
        return self._format(redact=False)

    # --- building and checking ----------------------------------------------------------------

    def with_attributes(self, **changes: Unpack[_Pkcs11Changes]) -> Pkcs11URI:
        """Return a copy with the given fields replaced (``None`` removes one), validated again."""
        return dataclasses.replace(self, **changes)

    def require_recognized_path_attributes(self) -> None:
        """Raise URIError if the path contains a vendor attribute.

        RFC 7512 recommends that an unrecognized path attribute make the URI match no object.
        The SDK recognizes no vendor attribute, so a key lookup stops here instead of ignoring
        the attribute and matching more objects than the URI names.
        """
        if self.vendor_path:
            names = ", ".join(repr(name) for name, _ in self.vendor_path)
            raise URIError(
                f"{self} has the unrecognized path attribute(s) {names}, so it matches no "
                "object; remove them"
            )


def _check_library_version(version: object) -> None:
    if not (
        isinstance(version, tuple)
        and len(version) == 2
        and all(isinstance(part, int) and not isinstance(part, bool) for part in version)
    ):
        raise URIError(f"library_version must be a (major, minor) tuple of ints, got {version!r}")
    if not all(0 <= part <= MAX_VERSION_PART for part in version):
        raise URIError(
            f"invalid library-version {version[0]}.{version[1]}: major and minor are each "
            f"between 0 and {MAX_VERSION_PART}"
        )


def _parse_path(path: str) -> dict[str, object]:
    fields: dict[str, object] = {}
    vendor: list[tuple[str, str]] = []
    seen: set[str] = set()
    if not path:
        return fields

    for part in path.split(";"):
        if not part:
            raise URIError("empty path attribute: remove the extra ';'")
        name, raw = _split_attribute(part, "path")
        _check_not_standard_in_other_case(name)
        if name in _QUERY_FIELDS:
            raise URIError(
                f"{name!r} is a query attribute: put it after '?', as in pkcs11:...?{name}=..."
            )
        if name in seen:
            raise URIError(f"duplicate path attribute {name!r}: give each attribute once")
        seen.add(name)

        if name in _PATH_FIELDS:
            fields[_PATH_FIELDS[name]] = _parse_path_value(name, raw)
        else:
            vendor.append((name, _decode_text(raw, name, _PATH_SAFE)))

    fields["vendor_path"] = tuple(vendor)
    return fields


def _parse_path_value(name: str, raw: str) -> object:
    if name == "id":
        return _percent_decode(raw, name, _PATH_SAFE)

    # RFC 3986 makes a percent-encoded unreserved character equal to the character itself, so
    # numbers and type names are compared after decoding.
    text = _decode_text(raw, name, _PATH_SAFE)

    if name == "slot-id":
        return _parse_decimal(text, name, raw, MAX_SLOT_ID)

    if name == "library-version":
        match = _VERSION_RE.fullmatch(text)
        if match is None:
            raise URIError(
                f"invalid {_describe(name, raw)}: write MAJOR or MAJOR.MINOR in decimal, "
                "such as 2 or 2.6"
            )
        major = _parse_decimal(match.group(1), name, raw, MAX_VERSION_PART)
        minor = _parse_decimal(match.group(2) or "0", name, raw, MAX_VERSION_PART)
        return (major, minor)

    if name == "type":
        if text not in OBJECT_TYPES:
            raise URIError(
                f"invalid {_describe(name, raw)}: use one of {', '.join(sorted(OBJECT_TYPES))}"
            )
        return text

    return text


def _parse_query(query: str) -> dict[str, object]:
    fields: dict[str, object] = {}
    vendor: list[tuple[str, str]] = []
    if not query:
        return fields

    for part in query.split("&"):
        if not part:
            raise URIError("empty query attribute: remove the extra '&'")
        name, raw = _split_attribute(part, "query")
        _check_not_standard_in_other_case(name)
        if name in _PATH_FIELDS:
            raise URIError(
                f"{name!r} is a path attribute: put it before '?', as in pkcs11:{name}=..."
            )

        if name in _QUERY_FIELDS:
            field = _QUERY_FIELDS[name]
            if field in fields:
                raise URIError(f"duplicate query attribute {name!r}: give each attribute once")
            fields[field] = _decode_text(raw, name, _QUERY_ACCEPTED)
        else:
            # RFC 7512 lets vendor query attributes repeat, so all are kept in order.
            vendor.append((name, _decode_text(raw, name, _QUERY_ACCEPTED)))

    fields["vendor_query"] = tuple(vendor)
    return fields


def _encode_path_text(text: str) -> str:
    return _percent_encode(text.encode(), _PATH_SAFE)


def _format_query_value(attribute: str, value: str, redact: bool) -> str:
    if redact and _is_secret(attribute):
        return REDACTED
    return _percent_encode(value.encode(), _QUERY_SAFE)


def _format_path_value(attribute: str, value: object) -> str:
    if attribute == "id":
        assert isinstance(value, bytes)
        return "".join(f"%{byte:02X}" for byte in value)
    if attribute == "slot-id":
        return str(value)
    if attribute == "library-version":
        assert isinstance(value, tuple)
        major, minor = value
        return str(major) if minor == 0 else f"{major}.{minor}"
    assert isinstance(value, str)
    return _encode_path_text(value)


# --- PIN reading ----------------------------------------------------------------------------


def read_pin(uri: Pkcs11URI) -> str | None:
    """Return the PIN that ``uri`` gives: its pin-value, or the PIN read from its pin-source.

    Returns None when the URI gives neither, so the caller can use its own source.
    Raises ConfigError when the pin-source cannot be read or is unsafe.
    """
    if uri.pin_value is not None:
        return uri.pin_value
    if uri.pin_source is not None:
        return read_pin_source(uri.pin_source)
    return None


def read_pin_source(source: str) -> str:
    """Read the PIN from a pin-source: ``file:/path``, ``/path`` or ``env:NAME``."""
    kind, target = parse_pin_source(source)
    if kind == "env":
        return _read_pin_env(target)
    return _read_pin_file(target)


def parse_pin_source(source: str) -> tuple[str, str]:
    """Split a pin-source into ``("file", absolute path)`` or ``("env", variable name)``.

    Raises ConfigError for any other form. The message shows the value only where it is
    clearly a location, because a PIN typed here by mistake must not reach a log.
    """
    if source.startswith("env:"):
        name = source[len("env:") :]
        if not _ENV_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"invalid pin-source {source!r}: env: must be followed by an environment "
                "variable name such as env:DEVICE_SDK_PIN"
            )
        return "env", name

    if source.startswith("file:"):
        path = source[len("file:") :]
        if path.startswith("//"):
            # A file URI may name a host after "//": only an empty host or localhost is local.
            host, slash, rest = path[2:].partition("/")
            if host not in ("", "localhost") or not slash:
                raise ConfigError(
                    f"invalid pin-source {source!r}: a file: URI must name a local file, "
                    "as in file:/etc/device-sdk/pin"
                )
            path = "/" + rest
        if not path.startswith("/"):
            raise ConfigError(
                f"invalid pin-source {source!r}: the file must be given by an absolute path, "
                "as in file:/etc/device-sdk/pin"
            )
        return "file", path

    if source.startswith("/"):
        return "file", source

    if source.startswith("|"):
        raise ConfigError(
            "pin-source commands ('|/path/to/command') are not supported; write the PIN to a "
            "file of mode 0600 and use pin-source=file:/path/to/pin"
        )

    raise ConfigError(
        "unsupported pin-source (value not shown, in case it is a PIN): use "
        "file:/path/to/pin, /path/to/pin or env:VARIABLE"
    )


def _read_pin_env(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise ConfigError(f"pin-source env:{name}: the environment variable {name} is not set")
    if not value:
        raise ConfigError(f"pin-source env:{name}: the environment variable {name} is empty")
    logger.debug("read the PIN from environment variable %s", name)
    return value


def read_secret_file(path: str, label: str = "PIN") -> str:
    """Read a secret from a file with the checks a PIN file gets, wording errors for ``label``.

    The file must be a regular file owned by the current user, with no group or other access
    (mode 0600), at most MAX_PIN_FILE_BYTES long, valid UTF-8 and not empty. One trailing newline
    is dropped. ``label`` names the secret in errors and logs ("PIN", "enrollment token").
    Raises ConfigError naming the file and the fix; the message never contains the secret.
    """
    return _read_pin_file(path, label)


def _read_pin_file(path: str, label: str = "PIN") -> str:
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    try:
        # O_NONBLOCK keeps a FIFO from blocking the open, and the fstat check below rejects it.
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ConfigError(
            f"{label} file {path} not found; write the {label} to it and run: chmod 600 {path}"
        ) from None
    except PermissionError:
        raise ConfigError(
            f"{label} file {path} cannot be read by uid {os.geteuid()}: permission denied; "
            f"make the user that runs the SDK its owner and run: chmod 600 {path}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{label} file {path} cannot be opened: {exc.strerror}") from None

    try:
        data = _read_checked_pin_file(fd, path, label)
    finally:
        os.close(fd)

    text = _decode_pin(data, path, label)
    logger.debug("read the %s from file %s", label, path)
    return text


def _read_checked_pin_file(fd: int, path: str, label: str) -> bytes:
    # Checks run on the opened descriptor, so a file swapped after the check cannot be read.
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        target = "pin-source" if label == "PIN" else "it"
        raise ConfigError(
            f"{label} file {path} is not a regular file; point {target} at a file"
        )

    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{label} file {path} has mode {mode:04o}, which gives group or others access; "
            f"run: chmod 600 {path}"
        )

    euid = os.geteuid()
    if info.st_uid != euid:
        raise ConfigError(
            f"{label} file {path} is owned by uid {info.st_uid}, not by the current user "
            f"(uid {euid}); run: chown {_user_name(euid)} {path}"
        )

    chunks = []
    size = 0
    while size <= MAX_PIN_FILE_BYTES:
        chunk = os.read(fd, MAX_PIN_FILE_BYTES + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > MAX_PIN_FILE_BYTES:
        raise ConfigError(
            f"{label} file {path} is larger than {MAX_PIN_FILE_BYTES} bytes; it must hold "
            f"only the {label}"
        )
    return b"".join(chunks)


def _decode_pin(data: bytes, path: str, label: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{label} file {path} is not valid UTF-8") from None

    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise ConfigError(f"{label} file {path} is empty; write the {label} to it")
    return text


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# --- module resolution ----------------------------------------------------------------------


def resolve_module(uri: Pkcs11URI, search_dirs: Sequence[str] | None = None) -> str | None:
    """Return the PKCS#11 library file that ``uri`` names, or None when it names none.

    ``module-path`` wins over ``module-name``; a name is looked up in ``search_dirs``
    (default :data:`MODULE_SEARCH_DIRS`). Raises ConfigError when the file is not there.
    """
    if uri.module_path is not None:
        if not os.path.isfile(uri.module_path):
            raise ConfigError(
                f"module-path {uri.module_path} does not exist or is not a file; install the "
                "PKCS#11 library or correct the path"
            )
        return uri.module_path
    if uri.module_name is not None:
        return find_module(uri.module_name, search_dirs)
    return None


def find_module(name: str, search_dirs: Sequence[str] | None = None) -> str:
    """Find the library file of PKCS#11 module ``name`` (``softhsm2``, ``opensc-pkcs11``)."""
    directories = MODULE_SEARCH_DIRS if search_dirs is None else tuple(search_dirs)
    candidates = _module_file_names(name)
    for directory in directories:
        for candidate in candidates:
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                logger.debug("module-name %s resolved to %s", name, path)
                return path
    raise ConfigError(
        f"PKCS#11 module {name!r} not found as {' or '.join(candidates)} in "
        f"{', '.join(directories)}; install it, or give its file with module-path=/path/lib.so"
    )


def _module_file_names(name: str) -> tuple[str, ...]:
    if name.endswith((".so", ".dylib")) or ".so." in name:
        return (name,)
    return (f"lib{name}.so", f"{name}.so", f"lib{name}.dylib", f"{name}.dylib")


# --- tpm2: and serial: ----------------------------------------------------------------------

# Persistent TPM 2.0 object handles: handle type TPM_HT_PERSISTENT (0x81) in the top byte.
TPM2_PERSISTENT_FIRST: Final = 0x81000000
TPM2_PERSISTENT_LAST: Final = 0x81FFFFFF

TPM2_HANDLE_MAX: Final = 0xFFFFFFFF

# The serial: numbers are at most 32 bits, the width of termios speed_t on Linux.
SERIAL_NUMBER_MAX: Final = 0xFFFFFFFF

# Path values of the SDK's own schemes may hold "/" unencoded, as in tpm2:path=/var/lib/key.pem.
_SCHEME_PATH_SAFE: Final = _PATH_SAFE | frozenset("/")


def _split_scheme(text: str, scheme: str, example: str) -> tuple[str, str]:
    if not isinstance(text, str):
        raise URIError(f"a {scheme}: URI must be a string, got {type(text).__name__}")
    name, colon, rest = text.partition(":")
    if not colon or name.lower() != scheme:
        raise URIError(f"not a {scheme}: URI: it must start with '{scheme}:', as in {example}")
    if "#" in rest:
        raise URIError(f"a {scheme}: URI has no fragment: percent-encode '#' as %23")
    path, _, query = rest.partition("?")
    return path, query


def _parse_query_pairs(query: str, scheme: str, known: Iterable[str]) -> dict[str, str]:
    """Parse ``name=value&...`` for the SDK's own schemes: known names only, each once."""
    known_names = tuple(known)
    values: dict[str, str] = {}
    if not query:
        return values
    for part in query.split("&"):
        if not part:
            raise URIError(f"empty query attribute in a {scheme}: URI: remove the extra '&'")
        name, raw = _split_attribute(part, "query")
        if name not in known_names:
            raise URIError(
                f"unknown query attribute {name!r} in a {scheme}: URI; "
                f"known: {', '.join(known_names)}"
            )
        if name in values:
            raise URIError(f"duplicate query attribute {name!r}: give each attribute once")
        values[name] = _decode_text(raw, name, _QUERY_ACCEPTED)
    return values


@dataclass(frozen=True)
class Tpm2URI:
    """A ``tpm2:`` key URI: a persistent handle or a TSS2 PEM key file, and an optional TCTI.

    ``tpm2:handle=0x81000010`` or ``tpm2:path=/var/lib/device-sdk/key.tss2.pem``, each with an
    optional ``?tcti=...`` (for example ``tcti=device:/dev/tpmrm0``); percent-encoding as in
    ``pkcs11:`` URIs.
    """

    handle: int | None = None
    path: str | None = None
    tcti: str | None = None

    def __post_init__(self) -> None:
        if (self.handle is None) == (self.path is None):
            raise URIError(
                "a tpm2: URI names exactly one key: tpm2:handle=0x81000010 or "
                "tpm2:path=/var/lib/device-sdk/key.tss2.pem"
            )
        if self.handle is not None:
            if isinstance(self.handle, bool) or not isinstance(self.handle, int):
                raise URIError(f"handle must be an int, got {self.handle!r}")
            if not TPM2_PERSISTENT_FIRST <= self.handle <= TPM2_PERSISTENT_LAST:
                raise URIError(
                    f"invalid handle 0x{self.handle:x}: a persistent TPM handle is between "
                    f"0x{TPM2_PERSISTENT_FIRST:08x} and 0x{TPM2_PERSISTENT_LAST:08x}"
                )
        if self.path is not None and (
            not isinstance(self.path, str) or not self.path.startswith("/")
        ):
            raise URIError(f"invalid path {self.path!r}: give the key file's absolute path")
        if self.tcti is not None and (not isinstance(self.tcti, str) or not self.tcti):
            raise URIError(
                f"invalid tcti {self.tcti!r}: give a TCTI such as device:/dev/tpmrm0 or "
                "swtpm:host=127.0.0.1,port=2321"
            )

    @classmethod
    def parse(cls, text: str) -> Tpm2URI:
        """Parse a ``tpm2:`` URI, raising URIError that names the attribute and value at fault."""
        path, query = _split_scheme(text, "tpm2", "tpm2:handle=0x81000010")
        attributes: dict[str, str] = {}
        if path:
            for part in path.split(";"):
                if not part:
                    raise URIError("empty path attribute in a tpm2: URI: remove the extra ';'")
                name, raw = _split_attribute(part, "path")
                if name not in ("handle", "path"):
                    raise URIError(
                        f"unknown path attribute {name!r} in a tpm2: URI; known: handle, path"
                    )
                if name in attributes:
                    raise URIError(f"duplicate path attribute {name!r}: give it once")
                attributes[name] = raw

        handle = None
        if "handle" in attributes:
            handle = _parse_tpm2_handle(attributes["handle"])
        key_path = None
        if "path" in attributes:
            key_path = _decode_text(attributes["path"], "path", _SCHEME_PATH_SAFE)
        query_values = _parse_query_pairs(query, "tpm2", ("tcti",))
        return cls(handle=handle, path=key_path, tcti=query_values.get("tcti"))

    def __str__(self) -> str:
        if self.handle is not None:
            text = f"tpm2:handle=0x{self.handle:08x}"
        else:
            assert self.path is not None
            text = f"tpm2:path={_percent_encode(self.path.encode(), _SCHEME_PATH_SAFE)}"
        if self.tcti is not None:
            text += f"?tcti={_percent_encode(self.tcti.encode(), _QUERY_SAFE)}"
        return text


def _parse_tpm2_handle(raw: str) -> int:
    text = _decode_text(raw, "handle", _SCHEME_PATH_SAFE)
    hex_digits = text[2:] if text[:2].lower() == "0x" else None
    if hex_digits and all(char in _HEX_DIGITS for char in hex_digits):
        # Handles are 32 bits, so more significant digits cannot name one.
        if len(hex_digits.lstrip("0")) > 8:
            raise URIError(f"invalid {_describe('handle', raw)}: a TPM handle has 32 bits")
        return int(hex_digits, 16)
    if _DIGITS_RE.fullmatch(text):
        return _parse_decimal(text, "handle", raw, TPM2_HANDLE_MAX)
    raise URIError(
        f"invalid {_describe('handle', raw)}: write the persistent handle in hex, "
        "as in handle=0x81000010"
    )


@dataclass(frozen=True)
class SerialURI:
    """A ``serial:`` key URI: the secure element behind a serial device.

    ``serial:/dev/ttyACM0?baud=115200&slot=0``; ``baud`` defaults to 115200 and ``slot`` (the
    key slot in the secure element) to 0.
    """

    device: str
    baud: int = 115200
    slot: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device.startswith("/"):
            raise URIError(
                f"invalid serial device {self.device!r}: give its absolute path, as in "
                "serial:/dev/ttyACM0"
            )
        for name in ("baud", "slot"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise URIError(f"{name} must be an int, got {value!r}")
        if self.baud <= 0:
            raise URIError(f"invalid baud {self.baud}: give a positive bit rate such as 115200")
        if self.slot < 0:
            raise URIError(f"invalid slot {self.slot}: slots are numbered from 0")

    @classmethod
    def parse(cls, text: str) -> SerialURI:
        """Parse a ``serial:`` URI, raising URIError that names the attribute and value at fault."""
        path, query = _split_scheme(text, "serial", "serial:/dev/ttyACM0?baud=115200&slot=0")
        if path.startswith("//"):
            raise URIError(
                "a serial: URI takes the device path right after the colon, as in "
                "serial:/dev/ttyACM0, without '//'"
            )
        if not path:
            raise URIError("a serial: URI needs a device path, as in serial:/dev/ttyACM0")
        device = _decode_text(path, "device", _SCHEME_PATH_SAFE)

        values = _parse_query_pairs(query, "serial", ("baud", "slot"))
        numbers: dict[str, int] = {}
        for name, value in values.items():
            numbers[name] = _parse_decimal(value, name, value, SERIAL_NUMBER_MAX)
        return cls(device=device, **numbers)

    def __str__(self) -> str:
        device = _percent_encode(self.device.encode(), _SCHEME_PATH_SAFE)
        return f"serial:{device}?baud={self.baud}&slot={self.slot}"


def parse_key_uri(text: str) -> Pkcs11URI | Tpm2URI | SerialURI:
    """Parse a key URI of any scheme the SDK supports."""
    scheme, colon = "", ""
    if isinstance(text, str):
        scheme, colon, _ = text.partition(":")
        scheme = scheme.lower()
    if scheme == "pkcs11":
        return Pkcs11URI.parse(text)
    if scheme == "tpm2":
        return Tpm2URI.parse(text)
    if scheme == "serial":
        return SerialURI.parse(text)
    # Without a colon the text may be anything, a PIN included, so it is not shown.
    scheme_text = f" {scheme!r}" if colon and _SCHEME_RE.fullmatch(scheme) else ""
    raise URIError(f"unsupported key URI scheme{scheme_text}: use pkcs11:, tpm2: or serial:")
