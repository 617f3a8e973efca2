"""Property tests: random and mutated assertions reach the verifier core.

Whatever the input, ``verify_assertion`` either accepts the one genuine assertion or raises
VerificationError with a documented reason, never another exception.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures_verifier import ManualClock, enroll, http_assertion, make_verifier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_sdk.auth import b64url_encode
from device_sdk.errors import VerificationError
from device_sdk.verifier import Verifier

REASONS = {
    "malformed",
    "unsupported_algorithm",
    "algorithm_mismatch",
    "bad_type",
    "unknown_device",
    "revoked_device",
    "wrong_audience",
    "unknown_nonce",
    "replayed",
    "challenge_expired",
    "wrong_device",
    "expired",
    "iat_in_future",
    "lifetime_too_long",
    "missing_channel_binding",
    "channel_binding_mismatch",
    "bad_signature",
    "rate_limited",
}

PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Verifier, str]:
    """One verifier and one genuine assertion, shared by every example.

    Mutated assertions never pass the signature check, which comes before the nonce, so the
    genuine assertion stays usable until the last test spends it.
    """
    verifier = make_verifier(Path(tmp_path_factory.mktemp("properties")), ManualClock())
    device = enroll(verifier)
    return verifier, http_assertion(verifier, device)


def check_rejected(verifier: Verifier, token: str) -> None:
    with pytest.raises(VerificationError) as caught:
        verifier.verify_assertion(token, audience_kind="http", client_address="192.0.2.1")
    assert caught.value.reason in REASONS


@PROPERTY_SETTINGS
@given(position=st.integers(min_value=0), replacement=st.characters(codec="utf-8"))
def test_one_character_changed(
    setup: tuple[Verifier, str], position: int, replacement: str
) -> None:
    verifier, genuine = setup
    index = position % len(genuine)
    mutated = genuine[:index] + replacement + genuine[index + 1 :]
    if mutated != genuine:
        check_rejected(verifier, mutated)


@PROPERTY_SETTINGS
@given(start=st.integers(min_value=0), length=st.integers(min_value=1, max_value=40))
def test_slice_removed(setup: tuple[Verifier, str], start: int, length: int) -> None:
    verifier, genuine = setup
    index = start % len(genuine)
    check_rejected(verifier, genuine[:index] + genuine[index + length :])


@PROPERTY_SETTINGS
@given(text=st.text(max_size=300))
def test_random_text(setup: tuple[Verifier, str], text: str) -> None:
    check_rejected(setup[0], text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@PROPERTY_SETTINGS
@given(
    header=st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit", "jwk"]), json_values),
    claims=st.dictionaries(
        st.sampled_from(["iss", "sub", "aud", "iat", "exp", "jti", "nonce", "cb", "htm", "htu"]),
        json_values,
    ),
    signature=st.binary(max_size=128),
)
def test_random_json_parts(
    setup: tuple[Verifier, str],
    header: dict[str, object],
    claims: dict[str, object],
    signature: bytes,
) -> None:
    parts = [
        b64url_encode(json.dumps(header).encode()),
        b64url_encode(json.dumps(claims).encode()),
        b64url_encode(signature),
    ]
    check_rejected(setup[0], ".".join(parts))


def test_zz_genuine_assertion_still_accepted(setup: tuple[Verifier, str]) -> None:
    # Runs last in this file: none of the rejected inputs spent the genuine challenge.
    verifier, genuine = setup
    assert (
        verifier.verify_assertion(genuine, audience_kind="http").audience == "https://verifier.test"
    )
