"""The device record cache of SQLiteDeviceRegistry never lets a revoked device log in.

Each test runs two verifiers on one SQLite file whose challenge store and registry share their
connections, and warms the cache of the first one before the device is revoked elsewhere. The
tests run twice: with the challenge store checking device status, as ``Verifier.open`` sets it
up (the verifier then trusts a successful nonce consume and skips the registry), and without
(the verifier asks the registry, which checks ``PRAGMA data_version``).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_verifier import (
    NONCELESS_BROKER,
    Device,
    ManualClock,
    enroll,
    http_assertion,
    verifier_config,
)

from device_sdk.auth import ServerClock, mqtt_password_without_nonce
from device_sdk.auth.assertion import new_jti, sign_assertion
from device_sdk.errors import VerificationError
from device_sdk.verifier import SQLiteChallengeStore, SQLiteDeviceRegistry, Verifier
from device_sdk.verifier.registry import ACTIVE, REVOKED


def open_verifier(database: Path, clock: ManualClock, check_device_status: bool) -> Verifier:
    registry = SQLiteDeviceRegistry(database)
    return Verifier(
        verifier_config(),
        registry=registry,
        challenges=SQLiteChallengeStore(
            registry.connections, check_device_status=check_device_status
        ),
        clock=clock,
    )


@pytest.fixture(params=[True, False], ids=["store-checks-status", "registry-checks-status"])
def check_device_status(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def pair(
    tmp_path: Path, clock: ManualClock, check_device_status: bool
) -> Iterator[tuple[Verifier, Verifier]]:
    first = open_verifier(tmp_path / "verifier.db", clock, check_device_status)
    second = open_verifier(tmp_path / "verifier.db", clock, check_device_status)
    yield first, second
    first.close()
    second.close()


def warm_device(verifier: Verifier) -> tuple[Device, str]:
    """Enroll a device, log it in once so its record is cached, and sign a second assertion."""
    device = enroll(verifier)
    verifier.verify_assertion(http_assertion(verifier, device), audience_kind="http")
    return device, http_assertion(verifier, device)


def reason_of(verifier: Verifier, assertion: str) -> str:
    with pytest.raises(VerificationError) as caught:
        verifier.verify_assertion(assertion, audience_kind="http")
    return caught.value.reason


def test_revoke_by_other_verifier_rejected(pair: tuple[Verifier, Verifier]) -> None:
    first, second = pair
    device, assertion = warm_device(first)

    second.revoke(device.device_id)

    assert reason_of(first, assertion) == "revoked_device"


def test_status_change_by_other_registry_rejected(pair: tuple[Verifier, Verifier]) -> None:
    # set_status alone, without the purge Verifier.revoke adds.
    first, second = pair
    device, assertion = warm_device(first)

    second.registry.set_status(device.device_id, REVOKED, first.now())

    assert reason_of(first, assertion) == "revoked_device"


def test_revoke_from_other_thread_rejected(pair: tuple[Verifier, Verifier]) -> None:
    first, second = pair
    device, assertion = warm_device(first)

    revoker = threading.Thread(target=second.revoke, args=(device.device_id,))
    revoker.start()
    revoker.join()

    assert reason_of(first, assertion) == "revoked_device"


def test_revoke_by_other_process_rejected(tmp_path: Path, pair: tuple[Verifier, Verifier]) -> None:
    first, _ = pair
    device, assertion = warm_device(first)

    script = (
        "import sqlite3, sys\n"
        "connection = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "connection.execute(\"UPDATE devices SET status = 'revoked' WHERE device_id = ?\", "
        "(sys.argv[2],))\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "verifier.db"), device.device_id],
        check=True,
        timeout=30,
    )

    assert reason_of(first, assertion) == "revoked_device"


def test_nonceless_login_after_other_revoke_rejected(
    pair: tuple[Verifier, Verifier], clock: ManualClock
) -> None:
    # Without a nonce no consume proves the device active, so the registry must be read.
    first, second = pair
    device, _ = warm_device(first)

    second.registry.set_status(device.device_id, REVOKED, first.now())

    password = mqtt_password_without_nonce(
        device.key, NONCELESS_BROKER, None, clock=ServerClock(clock.now)
    )
    with pytest.raises(VerificationError) as caught:
        first.verify_assertion(password, audience_kind="mqtt")
    assert caught.value.reason == "revoked_device"


def test_null_nonce_after_other_revoke_rejected(
    pair: tuple[Verifier, Verifier], clock: ManualClock
) -> None:
    # "nonce": null is read as no nonce, so it must not count as proof either.
    first, second = pair
    device, _ = warm_device(first)
    second.registry.set_status(device.device_id, REVOKED, first.now())
    now = int(clock.now)
    claims = {
        "iss": device.device_id,
        "sub": device.device_id,
        "aud": NONCELESS_BROKER,
        "iat": now,
        "exp": now + 20,
        "jti": new_jti(),
        "nonce": None,
    }
    password = sign_assertion(device.key, claims, device_id=device.device_id)

    with pytest.raises(VerificationError) as caught:
        first.verify_assertion(password, audience_kind="mqtt")
    assert caught.value.reason == "revoked_device"


def test_reactivation_by_other_registry_accepted(pair: tuple[Verifier, Verifier]) -> None:
    first, second = pair
    device, assertion = warm_device(first)
    second.registry.set_status(device.device_id, REVOKED, first.now())
    assert reason_of(first, assertion) == "revoked_device"

    second.registry.set_status(device.device_id, ACTIVE, first.now())

    verified = first.verify_assertion(http_assertion(first, device), audience_kind="http")
    assert verified.device_id == device.device_id


def test_revoke_through_same_verifier_rejected(pair: tuple[Verifier, Verifier]) -> None:
    first, _ = pair
    device, assertion = warm_device(first)

    first.registry.set_status(device.device_id, REVOKED, first.now())

    assert reason_of(first, assertion) == "revoked_device"


def test_cached_lookup_skips_select(pair: tuple[Verifier, Verifier]) -> None:
    first, _ = pair
    device = enroll(first)
    registry = first.registry
    assert isinstance(registry, SQLiteDeviceRegistry)
    registry.get(device.device_id)

    statements: list[str] = []
    registry.connections.get().set_trace_callback(statements.append)
    record = registry.get(device.device_id)
    registry.connections.get().set_trace_callback(None)

    assert record is not None
    assert record.status == ACTIVE
    assert statements == ["PRAGMA data_version"]


def test_verify_reads_no_registry_when_store_checks_status(
    tmp_path: Path, clock: ManualClock
) -> None:
    # The point of check_device_status: one statement per verification, the nonce consume.
    verifier = open_verifier(tmp_path / "verifier.db", clock, check_device_status=True)
    try:
        device, assertion = warm_device(verifier)
        registry = verifier.registry
        assert isinstance(registry, SQLiteDeviceRegistry)

        statements: list[str] = []
        registry.connections.get().set_trace_callback(statements.append)
        verifier.verify_assertion(assertion, audience_kind="http")
        registry.connections.get().set_trace_callback(None)
    finally:
        verifier.close()

    assert len(statements) == 1
    assert statements[0].startswith("UPDATE challenges SET consumed = 1 WHERE nonce = ")


def test_revoke_before_challenge_insert_rejected(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The registry read of issue_challenge returns the device as active, then another verifier
    # revokes it before the challenge is stored. The store's conditional insert rejects it.
    first = open_verifier(tmp_path / "verifier.db", clock, check_device_status=True)
    second = open_verifier(tmp_path / "verifier.db", clock, check_device_status=True)
    try:
        device = enroll(first)
        active_record = first.registry.get(device.device_id)
        second.revoke(device.device_id)
        monkeypatch.setattr(first.registry, "get", lambda device_id: active_record)

        with pytest.raises(VerificationError) as caught:
            first.issue_challenge(device.device_id, first.config.issuer, "192.0.2.1")
    finally:
        first.close()
        second.close()

    assert caught.value.reason == "revoked_device"
    assert caught.value.detail == "device was revoked while its challenge was issued"


def test_unshared_challenge_store_still_correct(tmp_path: Path, clock: ManualClock) -> None:
    # Separate connections defeat the cache, because every nonce consume is another
    # connection's commit, but the results must stay the same.
    registry = SQLiteDeviceRegistry(tmp_path / "verifier.db")
    first = Verifier(
        verifier_config(),
        registry=registry,
        challenges=SQLiteChallengeStore(tmp_path / "verifier.db"),
        clock=clock,
    )
    second = open_verifier(tmp_path / "verifier.db", clock, check_device_status=False)
    try:
        device, assertion = warm_device(first)
        second.revoke(device.device_id)
        assert reason_of(first, assertion) == "revoked_device"
    finally:
        first.close()
        second.close()
