"""Tests for key URIs: RFC 7512 pkcs11: URIs, PIN reading, module lookup, tpm2: and serial:."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sdk.errors import ConfigError, URIError
from device_sdk.keys import uri as uri_module
from device_sdk.keys.uri import (
    MODULE_SEARCH_DIRS,
    Pkcs11URI,
    SerialURI,
    Tpm2URI,
    find_module,
    parse_key_uri,
    parse_pin_source,
    read_pin,
    read_pin_source,
    resolve_module,
)

# Every example URI of RFC 7512 section 3, with line breaks removed, the fields it must give,
# and the canonical form Pkcs11URI writes back (attributes in a fixed order, hex in upper case,
# every id byte encoded).
RFC_EXAMPLES = [
    ("pkcs11:", {}, "pkcs11:"),
    (
        "pkcs11:object=my-pubkey;type=public",
        {"object": "my-pubkey", "type": "public"},
        "pkcs11:object=my-pubkey;type=public",
    ),
    (
        "pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
        {"object": "my-key", "type": "private", "pin_source": "file:/etc/token"},
        "pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
    ),
    (
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;"
        "manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;"
        "id=%69%95%3E%5C%F4%BD%EC%91;serial=?pin-source=file:/etc/token_pin",
        {
            "token": "The Software PKCS#11 Softtoken",
            "manufacturer": "Snake Oil, Inc.",
            "model": "1.0",
            "object": "my-certificate",
            "type": "cert",
            "id": bytes.fromhex("69953e5cf4bdec91"),
            "serial": "",
            "pin_source": "file:/etc/token_pin",
        },
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;"
        "manufacturer=Snake%20Oil,%20Inc.;model=1.0;serial=;object=my-certificate;type=cert;"
        "id=%69%95%3E%5C%F4%BD%EC%91?pin-source=file:/etc/token_pin",
    ),
    (
        "pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
        {"object": "my-sign-key", "type": "private", "module_name": "mypkcs11"},
        "pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
    ),
    (
        "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
        {"object": "my-sign-key", "type": "private", "module_path": "/mnt/libmypkcs11.so.1"},
        "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
    ),
    (
        "pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc."
        "?pin-value=the-pin",
        {
            "token": "Software PKCS#11 softtoken",
            "manufacturer": "Snake Oil, Inc.",
            "pin_value": "the-pin",
        },
        "pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc."
        "?pin-value=the-pin",
    ),
    (
        "pkcs11:slot-description=Sun%20Metaslot",
        {"slot_description": "Sun Metaslot"},
        "pkcs11:slot-description=Sun%20Metaslot",
    ),
    (
        "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;"
        "library-description=Soft%20Token%20Library;library-version=1.23",
        {
            "library_manufacturer": "Snake Oil, Inc.",
            "library_description": "Soft Token Library",
            "library_version": (1, 23),
        },
        "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;"
        "library-description=Soft%20Token%20Library;library-version=1.23",
    ),
    (
        "pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;"
        "id=%01%02%03%Ba%dd%Ca%fe%04%05%06",
        {
            "token": "My token% created by Joe",
            "library_version": (3, 0),
            "id": bytes.fromhex("010203baddcafe040506"),
        },
        "pkcs11:token=My%20token%25%20created%20by%20Joe;id=%01%02%03%BA%DD%CA%FE%04%05%06;"
        "library-version=3",
    ),
    (
        "pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
        {"token": "A name with a substring %;", "object": "my-certificate", "type": "cert"},
        "pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
    ),
    (
        "pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;"
        "object=my-certificate;type=cert",
        {
            "token": "Name with a small A with acute: \u00e1",
            "object": "my-certificate",
            "type": "cert",
        },
        "pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;"
        "object=my-certificate;type=cert",
    ),
    (
        "pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a"
        "?pin-source=file:/etc/token_pin&vendor-bbb=value-b",
        {
            "token": "my-token",
            "object": "my-certificate",
            "type": "cert",
            "vendor_path": (("vendor-aaa", "value-a"),),
            "pin_source": "file:/etc/token_pin",
            "vendor_query": (("vendor-bbb", "value-b"),),
        },
        "pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a"
        "?pin-source=file:/etc/token_pin&vendor-bbb=value-b",
    ),
]


@pytest.mark.parametrize(("text", "fields", "canonical"), RFC_EXAMPLES)
def test_rfc_example_fields(text: str, fields: dict[str, object], canonical: str) -> None:
    uri = Pkcs11URI.parse(text)
    assert uri == Pkcs11URI(**fields)  # type: ignore[arg-type]
    for name, value in fields.items():
        assert getattr(uri, name) == value


@pytest.mark.parametrize(("text", "fields", "canonical"), RFC_EXAMPLES)
def test_rfc_example_canonical_form(text: str, fields: dict[str, object], canonical: str) -> None:
    uri = Pkcs11URI.parse(text)
    assert uri.format_unredacted() == canonical
    assert Pkcs11URI.parse(canonical) == uri


# --- more parsing cases ---------------------------------------------------------------------

PARSE_CASES = [
    # (text, fields)
    ("PKCS11:token=a", {"token": "a"}),
    ("pkcs11:?", {}),
    ("pkcs11:token=", {"token": ""}),
    ("pkcs11:id=", {"id": b""}),
    ("pkcs11:id=abc", {"id": b"abc"}),
    ("pkcs11:id=%00%ff", {"id": b"\x00\xff"}),
    ("pkcs11:slot-id=0", {"slot_id": 0}),
    ("pkcs11:slot-id=0007", {"slot_id": 7}),
    ("pkcs11:slot-id=%31", {"slot_id": 1}),
    ("pkcs11:slot-id=000000000000000000000000000000001", {"slot_id": 1}),
    ("pkcs11:type=%70rivate", {"type": "private"}),
    ("pkcs11:library-version=%32.0", {"library_version": (2, 0)}),
    ("pkcs11:slot-id=18446744073709551615", {"slot_id": 2**64 - 1}),
    ("pkcs11:library-version=2", {"library_version": (2, 0)}),
    ("pkcs11:library-version=2.6", {"library_version": (2, 6)}),
    ("pkcs11:library-version=255.255", {"library_version": (255, 255)}),
    ("pkcs11:type=secret-key", {"type": "secret-key"}),
    ("pkcs11:type=data", {"type": "data"}),
    ("pkcs11:slot-manufacturer=ACME%20Ltd", {"slot_manufacturer": "ACME Ltd"}),
    ("pkcs11:object=a=b", {"object": "a=b"}),
    ("pkcs11:object=a&b", {"object": "a&b"}),
    ("pkcs11:object=%41%62", {"object": "Ab"}),
    ("pkcs11:object=caf%c3%a9", {"object": "caf\u00e9"}),
    ("pkcs11:object=%F0%9F%94%91", {"object": "\U0001f511"}),
    ("pkcs11:?pin-value=a;b", {"pin_value": "a;b"}),
    ("pkcs11:?pin-source=|/usr/bin/pin-tool", {"pin_source": "|/usr/bin/pin-tool"}),
    ("pkcs11:?module-path=/usr/lib/a%20b.so", {"module_path": "/usr/lib/a b.so"}),
    ("pkcs11:x-muppet=cookie", {"vendor_path": (("x-muppet", "cookie"),)}),
    ("pkcs11:?x-a=1&x-a=2", {"vendor_query": (("x-a", "1"), ("x-a", "2"))}),
    ("pkcs11:?x_b=%2F", {"vendor_query": (("x_b", "/"),)}),
]


@pytest.mark.parametrize(("text", "fields"), PARSE_CASES)
def test_parse_cases(text: str, fields: dict[str, object]) -> None:
    assert Pkcs11URI.parse(text) == Pkcs11URI(**fields)  # type: ignore[arg-type]


FORMAT_CASES = [
    # (fields, canonical form)
    ({"object": "a b"}, "pkcs11:object=a%20b"),
    ({"object": "a;b?c/d#e%f"}, "pkcs11:object=a%3Bb%3Fc%2Fd%23e%25f"),
    ({"object": "caf\u00e9"}, "pkcs11:object=caf%C3%A9"),
    ({"object": "a&b=c"}, "pkcs11:object=a&b=c"),
    ({"id": b"\x01\xab"}, "pkcs11:id=%01%AB"),
    ({"id": b"A"}, "pkcs11:id=%41"),
    ({"library_version": (2, 0)}, "pkcs11:library-version=2"),
    ({"library_version": (2, 10)}, "pkcs11:library-version=2.10"),
    ({"pin_value": "a&b;c"}, "pkcs11:?pin-value=a%26b%3Bc"),
    ({"pin_source": "file:/etc/a b"}, "pkcs11:?pin-source=file:/etc/a%20b"),
    ({"pin_source": "|/bin/x?y"}, "pkcs11:?pin-source=|/bin/x?y"),
    (
        {"token": "t", "object": "o", "type": "private", "pin_source": "file:/etc/pin"},
        "pkcs11:token=t;object=o;type=private?pin-source=file:/etc/pin",
    ),
    (
        {"slot_id": 3, "token": "t", "module_name": "softhsm2", "pin_value": "1"},
        "pkcs11:token=t;slot-id=3?pin-value=1&module-name=softhsm2",
    ),
]


@pytest.mark.parametrize(("fields", "canonical"), FORMAT_CASES)
def test_format_cases(fields: dict[str, object], canonical: str) -> None:
    uri = Pkcs11URI(**fields)  # type: ignore[arg-type]
    assert uri.format_unredacted() == canonical
    assert Pkcs11URI.parse(canonical) == uri


# --- errors ---------------------------------------------------------------------------------

# (text, fragments the message must contain)
ERROR_CASES = [
    ("pkcs11", ["must start with 'pkcs11:'"]),
    ("http://example.com", ["must start with 'pkcs11:'"]),
    ("pkcs11:token=a#frag", ["fragment"]),
    ("pkcs11:token", ["has no '='"]),
    ("pkcs11:=a", ["empty name"]),
    ("pkcs11:to ken=a", ["invalid path attribute name 'to ken'"]),
    ("pkcs11:token=a;;object=b", ["empty path attribute"]),
    ("pkcs11:token=a;", ["empty path attribute"]),
    ("pkcs11:?pin-source=file:/a&&module-name=b", ["empty query attribute"]),
    ("pkcs11:token=a;token=b", ["duplicate path attribute 'token'"]),
    ("pkcs11:x-a=1;x-a=2", ["duplicate path attribute 'x-a'"]),
    ("pkcs11:?module-name=a&module-name=b", ["duplicate query attribute 'module-name'"]),
    ("pkcs11:Token=a", ["'Token'", "lower case", "'token'"]),
    ("pkcs11:?PIN-VALUE=a", ["'PIN-VALUE'", "lower case"]),
    ("pkcs11:module-path=/a.so", ["'module-path' is a query attribute", "after '?'"]),
    ("pkcs11:?token=a", ["'token' is a path attribute", "before '?'"]),
    ("pkcs11:object=a%2", ["invalid percent escape '%2'", "'object'", "'a%2'", "%25"]),
    ("pkcs11:object=a%zz", ["invalid percent escape '%zz'", "'object'", "'a%zz'"]),
    ("pkcs11:object=100%", ["invalid percent escape '%'", "'object'", "'100%'"]),
    ("pkcs11:object=a b", ["' '", "'object'", "'a b'", "percent-encoded"]),
    ("pkcs11:object=a/b", ["'/'", "'object'", "'a/b'"]),
    ("pkcs11:object=caf\u00e9", ["'\u00e9'", "'object'"]),
    ("pkcs11:object=%ff", ["'object'", "'%ff'", "not valid UTF-8"]),
    ("pkcs11:?module-name=%C3", ["'module-name'", "'%C3'", "not valid UTF-8"]),
    ("pkcs11:slot-id=", ["'slot-id'", "value ''", "decimal number"]),
    ("pkcs11:slot-id=-1", ["'slot-id'", "'-1'", "decimal number"]),
    ("pkcs11:slot-id=0x10", ["'slot-id'", "'0x10'"]),
    ("pkcs11:slot-id=\u0661", ["'slot-id'"]),
    ("pkcs11:slot-id=18446744073709551616", ["'slot-id'", "at most 18446744073709551615"]),
    ("pkcs11:slot-id=" + "9" * 5000, ["'slot-id'", "(5000 characters)", "at most"]),
    ("pkcs11:library-version=" + "1" * 5000, ["'library-version'", "at most 255"]),
    ("pkcs11:library-version=", ["'library-version'", "MAJOR.MINOR"]),
    ("pkcs11:library-version=1.", ["'library-version'", "'1.'"]),
    ("pkcs11:library-version=1.2.3", ["'library-version'", "'1.2.3'"]),
    ("pkcs11:library-version=v1", ["'library-version'", "'v1'"]),
    ("pkcs11:library-version=256", ["'library-version'", "'256'", "at most 255"]),
    ("pkcs11:library-version=1.300", ["'library-version'", "'1.300'"]),
    ("pkcs11:type=secret", ["'type'", "'secret'", "cert, data, private, public, secret-key"]),
    ("pkcs11:type=Private", ["'type'", "'Private'"]),
    ("pkcs11:type=", ["'type'", "value ''"]),
    ("pkcs11:?module-path=lib/a.so", ["module-path 'lib/a.so'", "absolute path"]),
    ("pkcs11:?module-name=/usr/lib/a.so", ["module-name '/usr/lib/a.so'", "module-path"]),
    ("pkcs11:?module-name=", ["module-name ''"]),
    ("pkcs11:?pin-source=file:/a&pin-value=b", ["pin-source and pin-value are both given"]),
]


@pytest.mark.parametrize(("text", "fragments"), ERROR_CASES)
def test_parse_errors(text: str, fragments: list[str]) -> None:
    with pytest.raises(URIError) as caught:
        Pkcs11URI.parse(text)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message


def test_parse_rejects_non_string() -> None:
    with pytest.raises(URIError, match="must be a string, got bytes"):
        Pkcs11URI.parse(b"pkcs11:token=a")  # type: ignore[arg-type]


SECRET = "S3cr3tPin"

# URIs that are wrong in a way that involves the PIN: no message may contain it.
SECRET_ERROR_CASES = [
    f"pkcs11:?pin-value={SECRET}%zz",
    f"pkcs11:?pin-value={SECRET}%",
    f"pkcs11:?pin-value={SECRET} x",
    f"pkcs11:?pin-value={SECRET}\u00e9",
    f"pkcs11:?pin-value={SECRET}%FF",
    f"pkcs11:?pin-value={SECRET}&pin-value={SECRET}",
    f"pkcs11:?pin-value={SECRET}&pin-source=file:/a",
    f"pkcs11:pin-value={SECRET}",
    f"pkcs11:token=a;pin-value={SECRET}",
    f"pkcs11:?{SECRET}",
    f"pkcs11:?pin-value={SECRET}#x",
    f"{SECRET}",
    f"pkcs11:token=a?pin-value={SECRET}&token=b",
    f"pkcs11:?x-pin-value={SECRET}%zz",
    f"pkcs11:?x-pin-value={SECRET} x",
    f"pkcs11:?x-pin-value={SECRET}%FF",
    f"pkcs11:x-password={SECRET}%",
]


@pytest.mark.parametrize("text", SECRET_ERROR_CASES)
def test_errors_never_show_pin(text: str) -> None:
    with pytest.raises(URIError) as caught:
        Pkcs11URI.parse(text)
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)


# --- redaction ------------------------------------------------------------------------------


def test_str_redacts_pin_value() -> None:
    uri = Pkcs11URI.parse(f"pkcs11:token=t;object=o?pin-value={SECRET}&module-name=m")
    assert str(uri) == "pkcs11:token=t;object=o?pin-value=REDACTED&module-name=m"
    assert f"{uri}" == str(uri)


def test_repr_redacts_pin_value() -> None:
    uri = Pkcs11URI.parse(f"pkcs11:token=t?pin-value={SECRET}")
    assert repr(uri) == "Pkcs11URI('pkcs11:token=t?pin-value=REDACTED')"
    assert SECRET not in repr([uri])
    assert SECRET not in repr({"key": uri})


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (f"pkcs11:?x-pin-value={SECRET}", "pkcs11:?x-pin-value=REDACTED"),
        (f"pkcs11:?X-Password={SECRET}&x-b=1", "pkcs11:?X-Password=REDACTED&x-b=1"),
        (f"pkcs11:token=t;x-secret={SECRET}", "pkcs11:token=t;x-secret=REDACTED"),
    ],
)
def test_secret_vendor_attributes_redacted(text: str, redacted: str) -> None:
    uri = Pkcs11URI.parse(text)
    assert str(uri) == redacted
    assert SECRET not in repr(uri)
    assert uri.format_unredacted() == text


def test_format_unredacted_keeps_pin_value() -> None:
    uri = Pkcs11URI.parse(f"pkcs11:token=t?pin-value={SECRET}")
    assert uri.format_unredacted() == f"pkcs11:token=t?pin-value={SECRET}"
    assert uri.pin_value == SECRET


def test_log_lines_redact_pin_value(caplog: pytest.LogCaptureFixture) -> None:
    uri = Pkcs11URI.parse(f"pkcs11:token=t?pin-value={SECRET}")
    log = logging.getLogger("test_uri")
    with caplog.at_level(logging.DEBUG, logger="test_uri"):
        log.info("opening %s", uri)
        log.info("opening %r", uri)
        log.info("opening %s", [uri])
    assert len(caplog.records) == 3
    assert SECRET not in caplog.text
    assert caplog.text.count("pin-value=REDACTED") == 3


def test_unrecognized_path_attribute_error_is_redacted() -> None:
    uri = Pkcs11URI.parse(f"pkcs11:token=t;x-a=1?pin-value={SECRET}")
    with pytest.raises(URIError) as caught:
        uri.require_recognized_path_attributes()
    assert "'x-a'" in str(caught.value)
    assert "matches no object" in str(caught.value)
    assert SECRET not in str(caught.value)


# --- building URIs --------------------------------------------------------------------------


def test_with_attributes_builds_provisioning_uri() -> None:
    base = Pkcs11URI(token="edge-01")
    built = base.with_attributes(
        object="device", type="private", pin_source="file:/etc/device-sdk/pin"
    )
    assert str(built) == (
        "pkcs11:token=edge-01;object=device;type=private?pin-source=file:/etc/device-sdk/pin"
    )
    assert base == Pkcs11URI(token="edge-01")


def test_with_attributes_removes_with_none() -> None:
    uri = Pkcs11URI.parse(f"pkcs11:token=t;object=o?pin-value={SECRET}")
    assert uri.with_attributes(pin_value=None).format_unredacted() == "pkcs11:token=t;object=o"


def test_with_attributes_validates_again() -> None:
    uri = Pkcs11URI(token="t")
    with pytest.raises(URIError, match="invalid type 'key'"):
        uri.with_attributes(type="key")
    with pytest.raises(URIError, match="invalid slot-id -1"):
        uri.with_attributes(slot_id=-1)
    with pytest.raises(URIError, match="pin-source and pin-value are both given"):
        uri.with_attributes(pin_source="env:PIN", pin_value="1")


def test_with_attributes_rejects_unknown_field() -> None:
    with pytest.raises(TypeError):
        Pkcs11URI().with_attributes(label="x")  # type: ignore[call-arg]


CONSTRUCTOR_ERROR_CASES = [
    ({"token": 5}, "token must be a string or None, got int"),
    ({"id": "abc"}, "id must be bytes or None, got str"),
    ({"slot_id": True}, "slot_id must be an int or None"),
    ({"slot_id": 2**64}, "invalid slot-id"),
    ({"library_version": (1,)}, "library_version must be a (major, minor) tuple"),
    ({"library_version": (1, 256)}, "invalid library-version 1.256"),
    ({"vendor_path": (("token", "a"),)}, "'token' is a standard attribute"),
    ({"vendor_query": (("Pin-Value", "a"),)}, "'Pin-Value' is a standard attribute"),
    ({"vendor_path": (("a b", "c"),)}, "invalid vendor attribute name 'a b'"),
    ({"vendor_path": (("x-a", "1"), ("x-a", "2"))}, "duplicate path attribute 'x-a'"),
    ({"vendor_path": [("x-a", "1")]}, "vendor_path must be a tuple"),
    ({"vendor_query": (("x-a", 1),)}, "vendor_query must hold (name, value) string pairs"),
]


@pytest.mark.parametrize(("fields", "message"), CONSTRUCTOR_ERROR_CASES)
def test_constructor_errors(fields: dict[str, object], message: str) -> None:
    with pytest.raises(URIError) as caught:
        Pkcs11URI(**fields)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_constructor_converts_bytearray_id() -> None:
    uri = Pkcs11URI(id=bytearray(b"\x01"))
    assert uri.id == b"\x01"
    assert type(uri.id) is bytes


def test_uri_is_hashable_and_frozen() -> None:
    uri = Pkcs11URI.parse("pkcs11:token=a;id=%01")
    assert hash(uri) == hash(Pkcs11URI.parse("pkcs11:id=%01;token=a"))
    with pytest.raises(AttributeError):
        uri.token = "b"  # type: ignore[misc]


def test_recognized_path_check_passes() -> None:
    Pkcs11URI.parse("pkcs11:token=a?x-vendor=1").require_recognized_path_attributes()


# --- property tests -------------------------------------------------------------------------

_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
_VENDOR_NAME = st.from_regex(r"[a-zA-Z0-9_-]{1,12}", fullmatch=True).filter(
    lambda name: name.lower() not in uri_module._STANDARD_NAMES and not uri_module._is_secret(name)
)


@st.composite
def pkcs11_uris(draw: st.DrawFn) -> Pkcs11URI:
    fields: dict[str, object] = {}
    for name in (
        "token",
        "manufacturer",
        "model",
        "serial",
        "object",
        "slot_description",
        "slot_manufacturer",
        "library_manufacturer",
        "library_description",
    ):
        fields[name] = draw(st.none() | _TEXT)

    fields["id"] = draw(st.none() | st.binary(max_size=20))
    fields["type"] = draw(st.none() | st.sampled_from(sorted(uri_module.OBJECT_TYPES)))
    fields["slot_id"] = draw(st.none() | st.integers(0, 2**64 - 1))
    fields["library_version"] = draw(
        st.none() | st.tuples(st.integers(0, 255), st.integers(0, 255))
    )
    fields["module_path"] = draw(st.none() | _TEXT.map(lambda text: "/" + text))
    fields["module_name"] = draw(st.none() | _TEXT.filter(lambda text: text and "/" not in text))

    pin = draw(st.sampled_from(["none", "source", "value"]))
    if pin == "source":
        fields["pin_source"] = draw(_TEXT)
    elif pin == "value":
        fields["pin_value"] = draw(_TEXT)

    vendor_path = draw(
        st.lists(st.tuples(_VENDOR_NAME, _TEXT), max_size=3, unique_by=lambda p: p[0])
    )
    fields["vendor_path"] = tuple(vendor_path)
    fields["vendor_query"] = tuple(draw(st.lists(st.tuples(_VENDOR_NAME, _TEXT), max_size=3)))
    return Pkcs11URI(**fields)  # type: ignore[arg-type]


@given(pkcs11_uris())
@settings(max_examples=300)
def test_format_then_parse_round_trips(uri: Pkcs11URI) -> None:
    text = uri.format_unredacted()
    parsed = Pkcs11URI.parse(text)
    assert parsed == uri
    assert parsed.format_unredacted() == text


@given(pkcs11_uris())
def test_redacted_form_parses_to_same_uri_without_pin(uri: Pkcs11URI) -> None:
    parsed = Pkcs11URI.parse(str(uri))
    if uri.pin_value is None:
        assert parsed == uri
    else:
        assert parsed.pin_value == "REDACTED"
        assert parsed.with_attributes(pin_value=uri.pin_value) == uri


@given(st.binary(max_size=64), _TEXT)
def test_random_id_and_object_round_trip(key_id: bytes, label: str) -> None:
    uri = Pkcs11URI(token="t", object=label, id=key_id, type="private")
    parsed = Pkcs11URI.parse(str(uri))
    assert parsed.id == key_id
    assert parsed.object == label


@given(st.text(min_size=1, max_size=30).filter(lambda pin: "REDACTED" not in pin))
def test_pin_value_never_in_str_or_repr(pin: str) -> None:
    marked = "PIN" + pin + "PIN"
    uri = Pkcs11URI(token="t", pin_value=marked)
    assert marked not in str(uri)
    assert marked not in repr(uri)


_URI_ALPHABET = st.sampled_from(list("pkcs11:;?&=%/#-_.~ aAzZ09fF\u00e9") + ["token", "id", "%4"])


@given(st.text(max_size=60))
def test_parse_random_text_raises_only_uri_error(text: str) -> None:
    for candidate in (text, "pkcs11:" + text):
        try:
            Pkcs11URI.parse(candidate)
        except URIError:
            pass


@given(st.lists(_URI_ALPHABET, max_size=40).map("".join))
def test_parse_uri_like_text_raises_only_uri_error(text: str) -> None:
    for candidate in ("pkcs11:" + text, "tpm2:" + text, "serial:" + text):
        try:
            parsed = parse_key_uri(candidate)
        except URIError:
            continue
        assert type(parsed).parse(str(parsed)) == parsed


# --- PIN reading ----------------------------------------------------------------------------


def write_pin_file(directory: Path, content: bytes, mode: int = 0o600) -> Path:
    path = directory / "pin"
    path.write_bytes(content)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"1234", "1234"),
        (b"1234\n", "1234"),
        (b"1234\r\n", "1234"),
        (b"1234\n\n", "1234\n"),
        (b" 12 34 ", " 12 34 "),
        (b"p\xc3\xa9n\n", "p\u00e9n"),
    ],
)
def test_read_pin_file_content(tmp_path: Path, content: bytes, expected: str) -> None:
    path = write_pin_file(tmp_path, content)
    assert read_pin(Pkcs11URI(pin_source=f"file:{path}")) == expected


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_read_pin_file_accepts_private_modes(tmp_path: Path, mode: int) -> None:
    path = write_pin_file(tmp_path, b"1234\n", mode)
    assert read_pin_source(str(path)) == "1234"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602, 0o610, 0o777])
def test_read_pin_file_rejects_open_modes(tmp_path: Path, mode: int) -> None:
    path = write_pin_file(tmp_path, b"1234\n", mode)
    with pytest.raises(ConfigError) as caught:
        read_pin_source(f"file:{path}")
    message = str(caught.value)
    assert str(path) in message
    assert f"mode {mode:04o}" in message
    assert f"chmod 600 {path}" in message
    assert "1234" not in message


def test_read_pin_file_rejects_other_owner(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("not applicable: only root can give a file to another user")
    path = write_pin_file(tmp_path, b"1234\n")
    os.chown(path, 65534, -1)
    with pytest.raises(ConfigError) as caught:
        read_pin_source(str(path))
    message = str(caught.value)
    assert f"owned by uid 65534, not by the current user (uid {os.geteuid()})" in message
    assert f"chown root {path}" in message


@pytest.mark.parametrize(
    "source_form", ["file:{path}", "file://{path}", "file://localhost{path}", "{path}"]
)
def test_read_pin_source_forms(tmp_path: Path, source_form: str) -> None:
    path = write_pin_file(tmp_path, b"4321\n")
    assert read_pin_source(source_form.format(path=path)) == "4321"


def test_read_pin_follows_symlink_to_private_file(tmp_path: Path) -> None:
    path = write_pin_file(tmp_path, b"4321\n")
    link = tmp_path / "link"
    link.symlink_to(path)
    assert read_pin_source(str(link)) == "4321"


def test_read_pin_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    with pytest.raises(ConfigError, match=f"PIN file {path} not found"):
        read_pin_source(str(path))


def test_read_pin_file_rejects_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a regular file"):
        read_pin_source(str(tmp_path))


def test_read_pin_file_rejects_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="is not a regular file"):
        read_pin_source(str(fifo))


def test_read_pin_file_rejects_empty(tmp_path: Path) -> None:
    path = write_pin_file(tmp_path, b"\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_pin_source(str(path))


def test_read_pin_file_rejects_large_file(tmp_path: Path) -> None:
    path = write_pin_file(tmp_path, b"1" * 4097)
    with pytest.raises(ConfigError, match="larger than 4096 bytes"):
        read_pin_source(str(path))


def test_read_pin_file_accepts_max_size(tmp_path: Path) -> None:
    path = write_pin_file(tmp_path, b"1" * 4096)
    assert read_pin_source(str(path)) == "1" * 4096


def test_read_pin_file_rejects_invalid_utf8(tmp_path: Path) -> None:
    path = write_pin_file(tmp_path, b"\xff\xfe")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        read_pin_source(str(path))


def test_read_pin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICE_SDK_TEST_PIN", "9876")
    assert read_pin(Pkcs11URI(pin_source="env:DEVICE_SDK_TEST_PIN")) == "9876"


def test_read_pin_env_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEVICE_SDK_TEST_PIN", raising=False)
    with pytest.raises(ConfigError, match="DEVICE_SDK_TEST_PIN is not set"):
        read_pin_source("env:DEVICE_SDK_TEST_PIN")


def test_read_pin_env_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICE_SDK_TEST_PIN", "")
    with pytest.raises(ConfigError, match="DEVICE_SDK_TEST_PIN is empty"):
        read_pin_source("env:DEVICE_SDK_TEST_PIN")


def test_read_pin_from_pin_value() -> None:
    assert read_pin(Pkcs11URI.parse("pkcs11:token=t?pin-value=12%2634")) == "12&34"


def test_read_pin_none_without_source() -> None:
    assert read_pin(Pkcs11URI.parse("pkcs11:token=t")) is None


def test_read_pin_logs_no_pin(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_pin_file(tmp_path, f"{SECRET}\n".encode())
    with caplog.at_level(logging.DEBUG, logger="device_sdk.keys.uri"):
        assert read_pin_source(str(path)) == SECRET
    assert str(path) in caplog.text
    assert SECRET not in caplog.text


# (pin-source, fragments the error must contain)
PIN_SOURCE_ERRORS = [
    ("env:", ["env: must be followed by an environment variable name"]),
    ("env:1ABC", ["'env:1ABC'"]),
    ("env:A-B", ["'env:A-B'"]),
    ("file:relative/pin", ["'file:relative/pin'", "absolute path"]),
    ("file://otherhost/etc/pin", ["'file://otherhost/etc/pin'", "local file"]),
    ("file://localhost", ["'file://localhost'"]),
    ("relative/pin", ["unsupported pin-source", "value not shown"]),
    ("1234", ["unsupported pin-source", "value not shown"]),
    ("|/usr/bin/pin-tool", ["commands", "not supported"]),
    ("builtin-dialog", ["unsupported pin-source"]),
]


@pytest.mark.parametrize(("source", "fragments"), PIN_SOURCE_ERRORS)
def test_pin_source_errors(source: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        read_pin_source(source)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message
    if source == "1234":
        assert "1234" not in message


def test_parse_pin_source_kinds() -> None:
    assert parse_pin_source("env:PIN") == ("env", "PIN")
    assert parse_pin_source("file:/etc/pin") == ("file", "/etc/pin")
    assert parse_pin_source("file:///etc/pin") == ("file", "/etc/pin")
    assert parse_pin_source("/etc/pin") == ("file", "/etc/pin")


# --- module resolution ----------------------------------------------------------------------


def test_resolve_module_path_wins(tmp_path: Path) -> None:
    library = tmp_path / "libexample.so"
    library.write_bytes(b"")
    uri = Pkcs11URI(module_path=str(library), module_name="softhsm2")
    assert resolve_module(uri) == str(library)


def test_resolve_module_path_missing(tmp_path: Path) -> None:
    uri = Pkcs11URI(module_path=str(tmp_path / "absent.so"))
    with pytest.raises(ConfigError, match="does not exist or is not a file"):
        resolve_module(uri)


def test_resolve_module_none_without_module() -> None:
    assert resolve_module(Pkcs11URI(token="t")) is None


@pytest.mark.parametrize(
    ("name", "file_name"),
    [
        ("example", "libexample.so"),
        ("example", "example.so"),
        ("example", "libexample.dylib"),
        ("opensc-pkcs11.so", "opensc-pkcs11.so"),
        ("libexample.so.1", "libexample.so.1"),
    ],
)
def test_find_module_file_names(tmp_path: Path, name: str, file_name: str) -> None:
    (tmp_path / file_name).write_bytes(b"")
    uri = Pkcs11URI(module_name=name)
    assert resolve_module(uri, search_dirs=[str(tmp_path)]) == str(tmp_path / file_name)


def test_find_module_searches_dirs_in_order(tmp_path: Path) -> None:
    first = tmp_path / "first"
    second = tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (second / "libexample.so").write_bytes(b"")
    assert find_module("example", [str(first), str(second)]) == str(second / "libexample.so")
    (first / "libexample.so").write_bytes(b"")
    assert find_module("example", [str(first), str(second)]) == str(first / "libexample.so")


def test_find_module_not_found(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        find_module("example", [str(tmp_path)])
    message = str(caught.value)
    assert "'example' not found as libexample.so or example.so" in message
    assert str(tmp_path) in message
    assert "module-path=" in message


def test_find_module_ignores_directories(tmp_path: Path) -> None:
    (tmp_path / "libexample.so").mkdir()
    with pytest.raises(ConfigError, match="not found"):
        find_module("example", [str(tmp_path)])


def test_find_softhsm_in_default_dirs() -> None:
    if not any(
        os.path.isfile(os.path.join(directory, "libsofthsm2.so"))
        for directory in MODULE_SEARCH_DIRS
    ):
        pytest.skip("SoftHSM not installed: apt-get install softhsm2")
    path = resolve_module(Pkcs11URI.parse("pkcs11:?module-name=softhsm2"))
    assert path is not None
    assert os.path.basename(path) == "libsofthsm2.so"
    assert stat.S_ISREG(os.stat(path).st_mode)


# --- tpm2: ----------------------------------------------------------------------------------

TPM2_CASES = [
    # (text, expected, canonical)
    ("tpm2:handle=0x81000010", Tpm2URI(handle=0x81000010), "tpm2:handle=0x81000010"),
    ("tpm2:handle=0X81ABCDEF", Tpm2URI(handle=0x81ABCDEF), "tpm2:handle=0x81abcdef"),
    ("tpm2:handle=2164260880", Tpm2URI(handle=0x81000010), "tpm2:handle=0x81000010"),
    (
        "tpm2:path=/var/lib/device-sdk/key.tss2.pem",
        Tpm2URI(path="/var/lib/device-sdk/key.tss2.pem"),
        "tpm2:path=/var/lib/device-sdk/key.tss2.pem",
    ),
    ("tpm2:path=/a%20b.pem", Tpm2URI(path="/a b.pem"), "tpm2:path=/a%20b.pem"),
    (
        "tpm2:handle=0x81000010?tcti=swtpm:host=127.0.0.1,port=2321",
        Tpm2URI(handle=0x81000010, tcti="swtpm:host=127.0.0.1,port=2321"),
        "tpm2:handle=0x81000010?tcti=swtpm:host=127.0.0.1,port=2321",
    ),
    (
        "tpm2:path=/k.pem?tcti=device:/dev/tpmrm0",
        Tpm2URI(path="/k.pem", tcti="device:/dev/tpmrm0"),
        "tpm2:path=/k.pem?tcti=device:/dev/tpmrm0",
    ),
    (
        "TPM2:handle=0x81000000?tcti=tabrmd:bus_type=session",
        Tpm2URI(handle=0x81000000, tcti="tabrmd:bus_type=session"),
        "tpm2:handle=0x81000000?tcti=tabrmd:bus_type=session",
    ),
]


@pytest.mark.parametrize(("text", "expected", "canonical"), TPM2_CASES)
def test_tpm2_parse(text: str, expected: Tpm2URI, canonical: str) -> None:
    parsed = Tpm2URI.parse(text)
    assert parsed == expected
    assert str(parsed) == canonical
    assert Tpm2URI.parse(canonical) == parsed
    assert parse_key_uri(text) == expected


TPM2_ERRORS = [
    ("tpm2:", ["exactly one key"]),
    ("tpm2:handle=0x81000010;path=/k.pem", ["exactly one key"]),
    ("tpm2:handle=0x81000010;handle=0x81000011", ["duplicate path attribute 'handle'"]),
    ("tpm2:handle=0x80000000", ["invalid handle 0x80000000", "0x81000000", "0x81ffffff"]),
    ("tpm2:handle=0x82000000", ["invalid handle 0x82000000"]),
    ("tpm2:handle=0x" + "f" * 5000, ["'handle'", "32 bits"]),
    ("tpm2:handle=" + "9" * 5000, ["'handle'", "at most 4294967295"]),
    ("tpm2:handle=0x", ["'handle'", "'0x'", "hex"]),
    ("tpm2:handle=0xZZ", ["'handle'", "'0xZZ'"]),
    ("tpm2:handle=", ["'handle'", "value ''"]),
    ("tpm2:path=key.pem", ["invalid path 'key.pem'", "absolute path"]),
    ("tpm2:path=/k%zz", ["invalid percent escape '%zz'", "'path'"]),
    ("tpm2:label=x", ["unknown path attribute 'label'", "handle, path"]),
    ("tpm2:handle=0x81000010?tcti=", ["invalid tcti ''"]),
    ("tpm2:handle=0x81000010?pin=1", ["unknown query attribute 'pin'", "known: tcti"]),
    ("tpm2:handle=0x81000010?tcti=a&tcti=b", ["duplicate query attribute 'tcti'"]),
    ("tpm2:handle=0x81000010;", ["empty path attribute"]),
    ("tpm2:?", ["exactly one key"]),
    ("tpm:handle=0x81000010", ["must start with 'tpm2:'"]),
    ("tpm2:handle=0x81000010#x", ["fragment"]),
]


@pytest.mark.parametrize(("text", "fragments"), TPM2_ERRORS)
def test_tpm2_errors(text: str, fragments: list[str]) -> None:
    with pytest.raises(URIError) as caught:
        Tpm2URI.parse(text)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_tpm2_empty_query_is_allowed() -> None:
    assert Tpm2URI.parse("tpm2:handle=0x81000010?") == Tpm2URI(handle=0x81000010)


# --- serial: --------------------------------------------------------------------------------

SERIAL_CASES = [
    (
        "serial:/dev/ttyACM0?baud=115200&slot=0",
        SerialURI(device="/dev/ttyACM0", baud=115200, slot=0),
        "serial:/dev/ttyACM0?baud=115200&slot=0",
    ),
    (
        "serial:/dev/ttyACM0",
        SerialURI(device="/dev/ttyACM0"),
        "serial:/dev/ttyACM0?baud=115200&slot=0",
    ),
    (
        "serial:/dev/pts/3?slot=2&baud=9600",
        SerialURI(device="/dev/pts/3", baud=9600, slot=2),
        "serial:/dev/pts/3?baud=9600&slot=2",
    ),
    (
        "serial:/dev/serial/by-id/usb-ACME%20SE-if00",
        SerialURI(device="/dev/serial/by-id/usb-ACME SE-if00"),
        "serial:/dev/serial/by-id/usb-ACME%20SE-if00?baud=115200&slot=0",
    ),
]


@pytest.mark.parametrize(("text", "expected", "canonical"), SERIAL_CASES)
def test_serial_parse(text: str, expected: SerialURI, canonical: str) -> None:
    parsed = SerialURI.parse(text)
    assert parsed == expected
    assert str(parsed) == canonical
    assert SerialURI.parse(canonical) == parsed
    assert parse_key_uri(text) == expected


SERIAL_ERRORS = [
    ("serial:", ["needs a device path"]),
    ("serial:?baud=9600", ["needs a device path"]),
    ("serial://dev/ttyACM0", ["without '//'"]),
    ("serial:ttyACM0", ["invalid serial device 'ttyACM0'", "absolute path"]),
    ("serial:/dev/ttyACM0?baud=fast", ["'baud'", "'fast'", "decimal number"]),
    ("serial:/dev/ttyACM0?baud=0", ["invalid baud 0"]),
    ("serial:/dev/ttyACM0?baud=" + "1" * 5000, ["'baud'", "at most 4294967295"]),
    ("serial:/dev/ttyACM0?baud=-1", ["'baud'", "'-1'"]),
    ("serial:/dev/ttyACM0?slot=x", ["'slot'", "'x'"]),
    ("serial:/dev/ttyACM0?parity=N", ["unknown query attribute 'parity'", "baud, slot"]),
    ("serial:/dev/ttyACM0?baud=1&baud=2", ["duplicate query attribute 'baud'"]),
    ("serial:/dev/tty%G0", ["invalid percent escape '%G0'", "'device'"]),
    ("serial:/dev/tty ACM0", ["' '", "'device'"]),
    ("serial:/dev/ttyACM0?baud", ["has no '='"]),
    ("serail:/dev/ttyACM0", ["must start with 'serial:'"]),
]


@pytest.mark.parametrize(("text", "fragments"), SERIAL_ERRORS)
def test_serial_errors(text: str, fragments: list[str]) -> None:
    with pytest.raises(URIError) as caught:
        SerialURI.parse(text)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_serial_constructor_rejects_negative_slot() -> None:
    with pytest.raises(URIError, match="invalid slot -1"):
        SerialURI(device="/dev/ttyACM0", slot=-1)


# --- dispatch -------------------------------------------------------------------------------


def test_parse_key_uri_dispatches_on_scheme() -> None:
    assert isinstance(parse_key_uri("pkcs11:token=a"), Pkcs11URI)
    assert isinstance(parse_key_uri("tpm2:handle=0x81000010"), Tpm2URI)
    assert isinstance(parse_key_uri("serial:/dev/ttyACM0"), SerialURI)


def test_parse_key_uri_unknown_scheme() -> None:
    with pytest.raises(URIError, match="unsupported key URI scheme 'file': use pkcs11:"):
        parse_key_uri("file:/etc/key.pem")


def test_parse_key_uri_hides_odd_scheme() -> None:
    with pytest.raises(URIError) as caught:
        parse_key_uri(SECRET)
    assert SECRET not in str(caught.value)


def test_public_names() -> None:
    assert sorted(uri_module.__all__) == sorted(
        [
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
    )
    for name in uri_module.__all__:
        assert hasattr(uri_module, name)
