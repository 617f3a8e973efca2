"""Strict base64url, JSON and ECDSA signature encodings."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from device_sdk.auth.encoding import (
    b64url_decode,
    b64url_encode,
    ecdsa_der_to_raw,
    ecdsa_raw_to_der,
    loads_json_object,
)
from device_sdk.errors import ProtocolError


@pytest.mark.parametrize("data", [b"", b"f", b"fo", b"foo", b"\xff\xfe\xfd\xfc", bytes(range(256))])
def test_b64url_round_trip(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text
    assert b64url_decode(text) == data


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Zm9v=", "only A-Z"),
        ("Zg==", "only A-Z"),
        ("a+b/", "only A-Z"),
        ("Zm9v\n", "only A-Z"),
        ("Zm9 v", "only A-Z"),
        ("Z", "length of 1"),
        ("Zh", "non-canonical"),
        ("Zm9vYh", "non-canonical"),
        ("\u0661\u0662", "only A-Z"),
    ],
)
def test_b64url_rejects(text: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        b64url_decode(text)


def test_json_object_parsed() -> None:
    assert loads_json_object(b'{"a": 1, "b": [true, null]}') == {"a": 1, "b": [True, None]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"x": {"a": 1, "a": 1}}', "duplicate key 'a'"),
        (b'{"a": NaN}', "NaN is not a number"),
        (b'{"a": Infinity}', "Infinity is not a number"),
        (b"[1, 2]", "expected an object, got list"),
        (b'"text"', "expected an object, got str"),
        (b"\xff{}", "not UTF-8"),
        (b"{", "invalid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
    ],
)
def test_json_rejects(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        loads_json_object(data)


@pytest.mark.parametrize(("curve", "size"), [(ec.SECP256R1(), 32), (ec.SECP384R1(), 48)])
def test_ecdsa_raw_der_round_trip(curve: ec.EllipticCurve, size: int) -> None:
    raw = (1).to_bytes(size, "big") + (2**200).to_bytes(size, "big")
    der = ecdsa_raw_to_der(raw, curve)
    assert der == encode_dss_signature(1, 2**200)
    assert ecdsa_der_to_raw(der, curve) == raw


def test_ecdsa_raw_wrong_width_rejected() -> None:
    with pytest.raises(ProtocolError, match="65 bytes, expected raw r\\|\\|s of 64 bytes"):
        ecdsa_raw_to_der(b"\x01" * 65, ec.SECP256R1())


@pytest.mark.parametrize(
    "der",
    [
        # Long-form length where the short form is due.
        bytes.fromhex("3081060201010201 02".replace(" ", "")),
        # A redundant leading zero on r.
        bytes.fromhex("300702020001020102"),
        # Trailing garbage after the SEQUENCE.
        bytes.fromhex("30060201010201020000"),
        # A negative r.
        bytes.fromhex("3006020181020102"),
        # Not a SEQUENCE at all.
        b"\x01" * 64,
    ],
)
def test_ecdsa_noncanonical_der_rejected(der: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid ECDSA signature"):
        ecdsa_der_to_raw(der, ec.SECP256R1())


def test_ecdsa_der_too_wide_rejected() -> None:
    der = encode_dss_signature(2**256, 1)
    with pytest.raises(ProtocolError, match="wider than 32 bytes"):
        ecdsa_der_to_raw(der, ec.SECP256R1())
