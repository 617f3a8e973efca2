"""Wycheproof signature vectors through the verifier's signature check.

Every ``valid`` vector must verify and every ``invalid`` one must be rejected. ``acceptable``
vectors (legal but discouraged inputs, such as BER-encoded signatures) are expected to be
rejected, because the verifier accepts exactly one encoding per algorithm. The vector files in
use today contain none.

The DER files test the device-side conversion: a token that returns DER where raw is due is
normalised by :func:`ecdsa_der_to_raw`, which must reject every non-canonical form, and the raw
result then goes through the same check as a JWS signature.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import VECTORS_DIR
from cryptography.hazmat.primitives import serialization

from device_sdk.auth.encoding import ecdsa_der_to_raw
from device_sdk.errors import ProtocolError, VerificationError
from device_sdk.verifier import verify_signature

WYCHEPROOF = VECTORS_DIR / "wycheproof"

FILES = {
    "ecdsa_secp256r1_sha256_p1363_test.json": ("ES256", "raw"),
    "ecdsa_secp384r1_sha384_p1363_test.json": ("ES384", "raw"),
    "ecdsa_secp256r1_sha256_test.json": ("ES256", "der"),
    "ecdsa_secp384r1_sha384_test.json": ("ES384", "der"),
    "ed25519_test.json": ("EdDSA", "raw"),
    "rsa_pss_2048_sha256_mgf1_32_test.json": ("PS256", "raw"),
}


def load_vectors(name: str) -> list[tuple[str, Any, dict[str, Any]]]:
    path = WYCHEPROOF / name
    if not path.exists():
        # Under DEVICE_SDK_REQUIRE_SERVICES=1 conftest turns this skip into a failure.
        pytest.skip(
            f"Wycheproof vector file {path} is missing: set DEVICE_SDK_VECTORS_DIR to a folder "
            "holding wycheproof/*.json from C2SP/wycheproof testvectors_v1"
        )
    data = json.loads(path.read_text())
    cases = []
    for group in data["testGroups"]:
        public_key = serialization.load_der_public_key(bytes.fromhex(group["publicKeyDer"]))
        for test in group["tests"]:
            cases.append((name, public_key, test))
    return cases


def check(algorithm: str, encoding: str, public_key: Any, test: dict[str, Any]) -> bool:
    """Run one vector through the verifier's check; True if it verified."""
    message = bytes.fromhex(test["msg"])
    signature = bytes.fromhex(test["sig"])
    try:
        if encoding == "der":
            signature = ecdsa_der_to_raw(signature, public_key.curve)
        verify_signature(algorithm, public_key, message, signature)
    except (VerificationError, ProtocolError):
        return False
    return True


@pytest.mark.parametrize("name", sorted(FILES))
def test_wycheproof_file(name: str) -> None:
    algorithm, encoding = FILES[name]
    cases = load_vectors(name)
    assert cases, f"{name} has no test vectors"

    wrong = []
    counts = {"valid": 0, "invalid": 0, "acceptable": 0}
    for _, public_key, test in cases:
        counts[test["result"]] += 1
        expected = test["result"] == "valid"
        if check(algorithm, encoding, public_key, test) != expected:
            wrong.append(f"tcId {test['tcId']} ({test['result']}): {test['comment']}")

    assert counts["valid"] > 0
    assert counts["invalid"] > 0
    assert wrong == []


def test_wycheproof_rejections_carry_reason() -> None:
    for _, public_key, test in load_vectors("ecdsa_secp256r1_sha256_p1363_test.json"):
        if test["result"] != "invalid":
            continue
        with pytest.raises(VerificationError) as caught:
            verify_signature(
                "ES256", public_key, bytes.fromhex(test["msg"]), bytes.fromhex(test["sig"])
            )
        assert caught.value.reason == "bad_signature", test["tcId"]


def test_vectors_are_outside_repository() -> None:
    repository = Path(__file__).resolve().parent.parent
    assert not WYCHEPROOF.resolve().is_relative_to(repository)
