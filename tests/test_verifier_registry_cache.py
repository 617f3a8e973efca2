"""The device record cache of SQLiteDeviceRegistry never lets a revoked device log in.

Each test runs two verifiers on one SQLite file, set up the way ``Verifier.open`` does it (the
challenge store and the registry share their connections), and warms the cache of the first
one before the device is revoked elsewhere.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_verifier import (
    Device,
    ManualClock,
    enroll,
    http_assertion,
    verifier_config,
)

from device_sdk.errors import VerificationError
from device_sdk.verifier import SQLiteChallengeStore, SQLiteDeviceRegistry, Verifier
from device_sdk.verifier.registry import ACTIVE, REVOKED


def open_verifier(database: Path, clock: ManualClock) -> Verifier:
    registry = SQLiteDeviceRegistry(database)
    return Verifier(
        verifier_config(),
        registry=registry,
        challenges=SQLiteChallengeStore(registry.connections),
        clock=clock,
    )


@pytest.fixture
def pair(tmp_path: Path, clock: ManualClock) -> Iterator[tuple[Verifier, Verifier]]:
    first = open_verifier(tmp_path / "verifier.db", clock)
    second = open_verifier(tmp_path / "verifier.db", clock)
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
    # set_status alone leaves the challenge in place, so only the registry lookup can reject.
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
    second = open_verifier(tmp_path / "verifier.db", clock)
    try:
        device, assertion = warm_device(first)
        second.revoke(device.device_id)
        assert reason_of(first, assertion) == "revoked_device"
    finally:
        first.close()
        second.close()
