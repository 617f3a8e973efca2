"""The PostgreSQL device registry: its contract, concurrency, reconnects and the CLI.

The contract tests at the top run on SQLite and PostgreSQL, so the two registries are held to
the same behaviour. The rest needs PostgreSQL: processes racing one enrollment token, two
verifiers sharing one registry, a server restart, and ``device-sdk verifier serve --postgres``
over HTTP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import psycopg
import pytest
from fixtures_services import (
    HOST,
    REPO_ROOT,
    HTTPServer,
    Postgres,
    RedisServer,
    UvicornFactory,
    free_port,
    running_postgres,
)
from fixtures_verifier import (
    ISSUER,
    REGISTRY_KINDS,
    ManualClock,
    enroll,
    http_assertion,
    make_csr,
    make_key,
    make_verifier,
    verifier_config,
)

from device_sdk.auth import Challenge, build_assertion, device_id_of
from device_sdk.cli.main import main as cli_main
from device_sdk.errors import ConfigError, StoreError, VerificationError
from device_sdk.verifier import (
    DeviceRecord,
    DeviceRegistry,
    RedisChallengeStore,
    Verifier,
    hash_enrollment_token,
)
from device_sdk.verifier.postgres import PostgresDeviceRegistry, check_postgres_url

NOW = 1_800_000_000
# The served verifier runs without TLS, so its issuer URL is http.
HTTP_ISSUER = "http://verifier.test"


def device_record(device_id: str, *, attested: bool = False) -> DeviceRecord:
    return DeviceRecord(
        device_id=device_id,
        algorithm="ES256",
        public_key_pem="-----BEGIN PUBLIC KEY-----\n(test)\n-----END PUBLIC KEY-----\n",
        status="active",
        backend="software",
        hardware_backed=False,
        enrolled_at=NOW,
        attested=attested,
    )


def reason_of(call: Callable[..., object], *args: object) -> str:
    with pytest.raises(VerificationError) as caught:
        call(*args)
    return caught.value.reason


# The registry contract, on SQLite and PostgreSQL


@pytest.fixture(params=REGISTRY_KINDS)
def registry_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def registry(open_registry: Callable[[], DeviceRegistry]) -> Iterator[DeviceRegistry]:
    opened = open_registry()
    yield opened
    opened.close()


def test_registry_enroll_and_get(registry: DeviceRegistry) -> None:
    registry.add_enrollment_token("t1", NOW, NOW + 60)
    record = device_record("d" * 43)

    stored, created = registry.enroll("t1", record, NOW)

    assert created is True
    assert stored == record
    assert registry.get("d" * 43) == record
    assert registry.get_unconfirmed("d" * 43) == record
    assert registry.get("x" * 43) is None
    assert registry.list_devices() == [record]


def test_registry_rerun_with_spent_token(registry: DeviceRegistry) -> None:
    registry.add_enrollment_token("t1", NOW, None)
    record = device_record("d" * 43)
    registry.enroll("t1", record, NOW)

    again, created = registry.enroll("t1", record, NOW + 5)

    assert created is False
    assert again == record
    assert reason_of(registry.enroll, "t1", device_record("e" * 43), NOW) == (
        "enrollment_token_used"
    )


def test_registry_unspent_token_stays_unspent(registry: DeviceRegistry) -> None:
    registry.add_enrollment_token("t1", NOW, None)
    registry.add_enrollment_token("t2", NOW, None)
    record = device_record("d" * 43)
    registry.enroll("t1", record, NOW)

    again, created = registry.enroll("t2", record, NOW)
    other, other_created = registry.enroll("t2", device_record("e" * 43), NOW)

    assert created is False
    assert again == record
    assert other_created is True
    assert other.device_id == "e" * 43


def test_registry_token_errors(registry: DeviceRegistry) -> None:
    registry.add_enrollment_token("expiring", NOW, NOW + 10)

    assert reason_of(registry.enroll, "missing", device_record("d" * 43), NOW) == (
        "enrollment_token_invalid"
    )
    assert reason_of(registry.enroll, "expiring", device_record("d" * 43), NOW + 10) == (
        "enrollment_token_invalid"
    )
    assert reason_of(registry.check_enrollment_token, "expiring", "d" * 43, NOW + 10) == (
        "enrollment_token_invalid"
    )
    assert reason_of(registry.check_enrollment_token, "missing", "d" * 43, NOW) == (
        "enrollment_token_invalid"
    )
    registry.check_enrollment_token("expiring", "d" * 43, NOW + 9)
    registry.enroll("expiring", device_record("d" * 43), NOW + 9)
    # Spent by this device, so its own re-run passes even after the expiry.
    registry.check_enrollment_token("expiring", "d" * 43, NOW + 100)
    assert reason_of(registry.check_enrollment_token, "expiring", "e" * 43, NOW) == (
        "enrollment_token_used"
    )


def test_registry_second_revoke_keeps_time(registry: DeviceRegistry) -> None:
    registry.add_enrollment_token("t1", NOW, None)
    registry.enroll("t1", device_record("d" * 43), NOW)
    registry.set_status("d" * 43, "revoked", NOW + 1)

    again = registry.set_status("d" * 43, "revoked", NOW + 50)
    reactivated = registry.set_status("d" * 43, "active", NOW + 60)
    revoked_later = registry.set_status("d" * 43, "revoked", NOW + 70)

    assert again is not None
    assert again.revoked_at == NOW + 1
    assert reactivated is not None
    assert reactivated.revoked_at is None
    assert revoked_later is not None
    assert revoked_later.revoked_at == NOW + 70


def test_registry_revoked_device_rejected(registry: DeviceRegistry) -> None:
    registry.add_enrollment_token("t1", NOW, None)
    registry.add_enrollment_token("t2", NOW, None)
    registry.enroll("t1", device_record("d" * 43), NOW)

    revoked = registry.set_status("d" * 43, "revoked", NOW + 1)

    assert revoked is not None
    assert revoked.status == "revoked"
    assert revoked.revoked_at == NOW + 1
    assert registry.get("d" * 43) == revoked
    assert registry.get_unconfirmed("d" * 43) == revoked
    assert reason_of(registry.enroll, "t1", device_record("d" * 43), NOW) == "revoked_device"
    assert reason_of(registry.enroll, "t2", device_record("d" * 43), NOW) == "revoked_device"
    # The rejected enrollment left t2 unspent.
    registry.check_enrollment_token("t2", "e" * 43, NOW)
    assert registry.set_status("x" * 43, "revoked", NOW) is None
    with pytest.raises(ValueError, match="neither 'active' nor 'revoked'"):
        registry.set_status("d" * 43, "paused", NOW)

    active = registry.set_status("d" * 43, "active", NOW + 2)
    assert active is not None
    assert active.status == "active"
    assert active.revoked_at is None


def test_registry_attested_upgrade(registry: DeviceRegistry) -> None:
    registry.add_enrollment_token("t1", NOW, None)
    registry.enroll("t1", device_record("d" * 43), NOW)

    upgraded, created = registry.enroll("t1", device_record("d" * 43, attested=True), NOW)

    assert created is False
    assert upgraded.attested is True
    stored = registry.get("d" * 43)
    assert stored is not None
    assert stored.attested is True


def test_registry_list_order(registry: DeviceRegistry) -> None:
    for number, device_id in enumerate(["b" * 43, "a" * 43, "B" * 43]):
        registry.add_enrollment_token(f"t{number}", NOW, None)
        record = device_record(device_id)
        # "a" enrolled last; "B" and "b" in the same second, so they sort bytewise.
        enrolled_at = NOW + 10 if device_id == "a" * 43 else NOW
        registry.enroll(f"t{number}", replace(record, enrolled_at=enrolled_at), NOW)

    assert [record.device_id for record in registry.list_devices()] == [
        "B" * 43, "b" * 43, "a" * 43,
    ]


def test_registry_certificate_first_wins(registry: DeviceRegistry) -> None:
    assert registry.device_certificate("d" * 43) is None

    first = registry.store_device_certificate("d" * 43, "first", NOW)
    second = registry.store_device_certificate("d" * 43, "second", NOW + 1)

    assert first == "first"
    assert second == "first"
    assert registry.device_certificate("d" * 43) == "first"


def test_registry_pending_attestation(registry: DeviceRegistry) -> None:
    registry.put_pending_attestation("t1", "state-1", NOW + 60, NOW)
    registry.put_pending_attestation("t1", "state-2", NOW + 70, NOW)
    registry.put_pending_attestation("t2", "old", NOW + 5, NOW)
    # Putting at NOW + 6 deletes the state of t2, which expired at NOW + 5.
    registry.put_pending_attestation("t3", "state-3", NOW + 80, NOW + 6)

    assert registry.take_pending_attestation("t1") == ("state-2", NOW + 70)
    assert registry.take_pending_attestation("t1") is None
    assert registry.take_pending_attestation("t2") is None
    assert registry.take_pending_attestation("t3") == ("state-3", NOW + 80)


# PostgreSQL only


def test_enrollment_token_stored_as_hash_postgres(
    postgres_database: str, tmp_path: Path, clock: ManualClock
) -> None:
    verifier = make_verifier(tmp_path, clock, registry=PostgresDeviceRegistry(postgres_database))
    token = verifier.create_enrollment_tokens(never_expire=True)[0]
    verifier.close()

    with psycopg.connect(postgres_database) as connection:
        rows = connection.execute(
            "SELECT token_hash, created_at, expires_at, used_by FROM enrollment_tokens"
        ).fetchall()
    assert rows == [(hash_enrollment_token(token), int(clock.now), None, None)]


def test_concurrent_opens_create_schema(postgres_database: str) -> None:
    errors: list[BaseException] = []
    registries: list[PostgresDeviceRegistry] = []
    barrier = threading.Barrier(6)

    def open_one() -> None:
        barrier.wait(timeout=30)
        try:
            registries.append(PostgresDeviceRegistry(postgres_database))
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for opened in registries:
        opened.close()

    assert errors == []
    assert len(registries) == 6


_RACE_SCRIPT = """
import json, sys, threading, time
from device_sdk.errors import VerificationError
from device_sdk.verifier.postgres import PostgresDeviceRegistry
from device_sdk.verifier.registry import DeviceRecord

url, token_hash, start_at, *device_ids = sys.argv[1:]
registry = PostgresDeviceRegistry(url)
# Each thread opens its connection before the start, so the enrollments leave together.
ready = threading.Barrier(len(device_ids))
outcomes = {}

def run(device_id):
    registry.get(device_id)
    ready.wait(timeout=30)
    time.sleep(max(0.0, float(start_at) - time.time()))
    record = DeviceRecord(device_id, "ES256", "pem", "active", "software", False, 1)
    try:
        outcomes[device_id] = "created" if registry.enroll(token_hash, record, 1)[1] else "existing"
    except VerificationError as exc:
        outcomes[device_id] = exc.reason

threads = [threading.Thread(target=run, args=(device_id,)) for device_id in device_ids]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
registry.close()
print(json.dumps(outcomes))
"""


def test_processes_race_one_enrollment_token(postgres_database: str) -> None:
    registry = PostgresDeviceRegistry(postgres_database)
    registry.add_enrollment_token("race", NOW, None)
    device_ids = [f"{number:02d}".ljust(43, "k") for number in range(12)]
    start_at = str(time.time() + 3)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE_SCRIPT, postgres_database, "race", start_at, *half],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for half in (device_ids[:6], device_ids[6:])
    ]
    outcomes: dict[str, str] = {}
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr.decode()
        outcomes.update(json.loads(stdout))

    winners = [device_id for device_id, outcome in outcomes.items() if outcome == "created"]
    assert len(outcomes) == 12
    assert len(winners) == 1
    assert sorted(outcomes.values()) == ["created"] + ["enrollment_token_used"] * 11
    assert [record.device_id for record in registry.list_devices()] == winners
    registry.close()
    with psycopg.connect(postgres_database) as connection:
        used_by = connection.execute(
            "SELECT used_by FROM enrollment_tokens WHERE token_hash = 'race'"
        ).fetchone()
    assert used_by == (winners[0],)


def test_one_key_races_several_tokens(postgres_database: str) -> None:
    registries = [PostgresDeviceRegistry(postgres_database) for _ in range(8)]
    for number in range(8):
        registries[0].add_enrollment_token(f"t{number}", NOW, None)
    barrier = threading.Barrier(8)
    outcomes: list[bool] = []
    errors: list[BaseException] = []

    def run(number: int) -> None:
        registries[number].get("d" * 43)
        barrier.wait(timeout=30)
        try:
            _, created = registries[number].enroll(f"t{number}", device_record("d" * 43), NOW)
            outcomes.append(created)
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for opened in registries:
        opened.close()

    assert errors == []
    assert sorted(outcomes) == [False] * 7 + [True]
    with psycopg.connect(postgres_database) as connection:
        spent = connection.execute(
            "SELECT count(*) FROM enrollment_tokens WHERE used_by IS NOT NULL"
        ).fetchone()
        devices = connection.execute("SELECT count(*) FROM devices").fetchone()
    assert spent == (1,)
    assert devices == (1,)


@pytest.fixture
def two_verifiers(
    postgres_database: str,
    redis_server: RedisServer,
    redis_client: object,
    tmp_path: Path,
) -> Iterator[tuple[Verifier, Verifier]]:
    """Two verifiers as two replicas: one PostgreSQL registry, one Redis, one signing key."""
    verifiers = [
        Verifier.open(
            None,
            verifier_config(),
            registry_url=postgres_database,
            redis_url=redis_server.url,
            signing_key_path=tmp_path / "signing-key.pem",
        )
        for _ in range(2)
    ]
    yield verifiers[0], verifiers[1]
    for verifier in verifiers:
        verifier.close()


def test_revocation_seen_by_other_verifier(two_verifiers: tuple[Verifier, Verifier]) -> None:
    first, second = two_verifiers
    device = enroll(first)
    verified = second.verify_assertion(http_assertion(second, device), audience_kind="http")
    access_token = first.issue_access_token(verified)["access_token"]
    pending = http_assertion(second, device)

    first.revoke(device.device_id)

    assert isinstance(first.registry, PostgresDeviceRegistry)
    assert isinstance(second.challenges, RedisChallengeStore)
    assert reason_of(second.issue_challenge, device.device_id, ISSUER, "192.0.2.1") == (
        "revoked_device"
    )
    with pytest.raises(VerificationError) as caught:
        second.verify_assertion(pending, audience_kind="http")
    # The revocation also purged the challenge; the status read reports the cause.
    assert caught.value.reason == "revoked_device"
    assert reason_of(second.verify_access_token, access_token) == "revoked_device"
    record = second.get_device(device.device_id)
    assert record is not None
    assert record.status == "revoked"


def test_status_only_revocation_after_key_cached_rejected(
    two_verifiers: tuple[Verifier, Verifier], postgres_database: str
) -> None:
    # The revocation commits after the verifier cached the device's key and before it spends
    # the nonce, and it leaves the challenge in Redis. The status read after the spend finds it.
    first, second = two_verifiers
    device = enroll(first)
    second.verify_assertion(http_assertion(second, device), audience_kind="http")
    pending = http_assertion(second, device)

    with psycopg.connect(postgres_database, autocommit=True, connect_timeout=10) as other:
        other.execute(
            "UPDATE devices SET status = 'revoked', revoked_at = 1 WHERE device_id = %s",
            (device.device_id,),
        )

    with pytest.raises(VerificationError) as caught:
        second.verify_assertion(pending, audience_kind="http")
    assert caught.value.reason == "revoked_device"


def test_replicas_share_signing_key_and_challenges(
    two_verifiers: tuple[Verifier, Verifier],
) -> None:
    first, second = two_verifiers
    device = enroll(first)
    challenge = Challenge.from_json(first.issue_challenge(device.device_id, ISSUER, "192.0.2.1"))
    assertion = build_assertion(
        device.key, challenge, channel_binding=b"\x11" * 32, htm="POST", htu=ISSUER + "/v1/token"
    )

    verified = second.verify_assertion(assertion, audience_kind="http")
    token = second.issue_access_token(verified)["access_token"]

    assert first.jwks() == second.jwks()
    assert first.verify_access_token(token)["sub"] == device.device_id
    with pytest.raises(VerificationError) as caught:
        first.verify_assertion(assertion, audience_kind="http")
    assert caught.value.reason == "replayed"


@pytest.mark.slow
def test_server_restart_then_reconnect() -> None:
    # A server of this test's own, so that the restart disturbs no other test.
    with running_postgres() as server:
        registry = PostgresDeviceRegistry(server.url)
        registry.add_enrollment_token("t1", NOW, None)
        registry.enroll("t1", device_record("d" * 43), NOW)

        server.process.stop()
        target = f"PostgreSQL registry at {HOST}:{server.port}/postgres"
        with pytest.raises(StoreError, match=target):
            registry.get("d" * 43)
        with pytest.raises(StoreError, match="cannot connect to the PostgreSQL registry"):
            registry.enroll("t1", device_record("d" * 43), NOW)
        server.process.start()
        server.wait_ready()

        record = registry.get("d" * 43)
        again, created = registry.enroll("t1", device_record("d" * 43), NOW)
        registry.close()

    assert record == device_record("d" * 43)
    assert again == record
    assert created is False


def test_restart_during_transaction_reconnects() -> None:
    with running_postgres() as server:
        registry = PostgresDeviceRegistry(server.url)
        registry.add_enrollment_token("t1", NOW, None)
        server.restart()

        with pytest.raises(StoreError, match="failed"):
            registry.enroll("t1", device_record("d" * 43), NOW)
        stored, created = registry.enroll("t1", device_record("d" * 43), NOW)
        registry.close()

    assert created is True
    assert stored == device_record("d" * 43)


def test_app_responds_503_while_registry_down(
    redis_server: RedisServer, redis_client: object, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from device_sdk.verifier.app import create_app

    with running_postgres() as server:
        verifier = Verifier.open(
            None,
            verifier_config(),
            registry_url=server.url,
            redis_url=redis_server.url,
            signing_key_path=tmp_path / "signing-key.pem",
        )
        device = enroll(verifier)
        body = {"device_id": device.device_id, "audience": ISSUER}
        with TestClient(create_app(verifier)) as client:
            before = client.post("/v1/challenges", json=body)
            server.process.stop()
            during = client.post("/v1/challenges", json=body)
            server.process.start()
            server.wait_ready()
            # Only the thread that served "before" had a connection, which the stop broke. If
            # the pool ran "during" on another thread, the first one fails once more later.
            after = [client.post("/v1/challenges", json=body).status_code for _ in range(20)]
        verifier.close()

    assert before.status_code == 200
    assert during.status_code == 503
    assert during.headers["retry-after"] == "1"
    assert during.json() == {"error": "unavailable"}
    assert after.count(503) <= 1
    assert after[-1] == 200
    assert after.count(200) + after.count(503) == 20


# Configuration and the CLI


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://verifier:s3cret-pw@127.0.0.1:5432/devices",
        "postgresql://verifier@127.0.0.1:5432/devices?password=s3cret-pw",
        "postgres://verifier:s3cret-pw@db.example/devices",
    ],
)
def test_url_with_password_rejected(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_postgres_url(url)

    message = str(caught.value)
    assert "PGPASSWORD" in message
    assert "~/.pgpass" in message
    assert "s3cret-pw" not in message


@pytest.mark.parametrize(
    "url",
    ["host=127.0.0.1 dbname=devices", "mysql://127.0.0.1/devices", "postgresql://[::1/x"],
)
def test_url_not_postgresql_rejected(url: str) -> None:
    with pytest.raises(ConfigError, match="postgresql://user@host:5432/dbname"):
        check_postgres_url(url)


def test_url_without_password_accepted() -> None:
    check_postgres_url("postgresql://verifier@127.0.0.1:5432/devices?sslmode=require")


@pytest.mark.parametrize(
    "argv",
    [
        ["verifier", "serve", "--postgres", "postgresql://u:s3cret-pw@127.0.0.1/d",
         "--redis", "redis://127.0.0.1:1/0", "--signing-key", "k.pem"],
        ["verifier", "enrollment-token", "create", "--postgres",
         "postgresql://u:s3cret-pw@127.0.0.1/d"],
        ["verifier", "devices", "list", "--postgres", "postgresql://u@127.0.0.1/d?password=s3cret-pw"],
        ["verifier", "devices", "show", "--postgres", "postgresql://u:s3cret-pw@127.0.0.1/d",
         "x" * 43],
        ["verifier", "devices", "revoke", "--postgres", "postgresql://u:s3cret-pw@127.0.0.1/d",
         "--redis", "redis://127.0.0.1:1/0", "x" * 43],
    ],
)
def test_cli_url_with_password_rejected(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli_main(argv)

    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("device-sdk: error: the PostgreSQL URL contains a password")
    assert "PGPASSWORD" in captured.err
    assert "s3cret-pw" not in captured.err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--signing-key", "k.pem"], "pass --redis redis://host:6379/0"),
        (["--redis", "redis://127.0.0.1:1/0"], "--postgres needs --signing-key PATH"),
    ],
)
def test_cli_serve_postgres_needs_redis_and_key(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["verifier", "serve", "--postgres", "postgresql://u@127.0.0.1/d", *options]

    status = cli_main(argv)

    assert status == 1
    assert message in capsys.readouterr().err


def test_cli_db_and_postgres_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli_main(["verifier", "devices", "list", "--db", "v.db", "--postgres",
                  "postgresql://u@127.0.0.1/d"])

    assert caught.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_revoke_postgres_needs_redis(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli_main(["verifier", "devices", "revoke", "--postgres",
                       "postgresql://u@127.0.0.1/d", "x" * 43])

    assert status == 1
    assert "revoke with --postgres needs the --redis URL" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"redis_url": None, "signing_key_path": "k.pem"}, "pass a Redis URL"),
        ({"redis_url": "redis://127.0.0.1:1/0", "signing_key_path": None}, "--signing-key PATH"),
    ],
)
def test_open_postgres_needs_redis_and_key(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Verifier.open(
            None, verifier_config(), registry_url="postgresql://u@127.0.0.1/d", **options  # type: ignore[arg-type]
        )


def test_open_needs_exactly_one_registry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs exactly one device registry"):
        Verifier.open(None, verifier_config())
    with pytest.raises(ConfigError, match="needs exactly one device registry"):
        Verifier.open(tmp_path / "v.db", verifier_config(), registry_url="postgresql://u@h/d")


def cli_output(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    status = cli_main(argv)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out


def serve_postgres(
    factory: UvicornFactory, postgres_url: str, redis_url: str, key_path: Path
) -> HTTPServer:
    port = free_port()
    argv = [
        sys.executable, "-m", "device_sdk", "verifier", "serve", "--postgres", postgres_url,
        "--redis", redis_url, "--signing-key", str(key_path), "--issuer", HTTP_ISSUER,
        "--host", HOST, "--port", str(port), "--log-level", "info", "--no-rate-limits",
    ]
    return factory.command(argv, port=port, name=f"verifier:{port}")


@pytest.mark.slow
def test_cli_serve_postgres_over_http(
    uvicorn_factory: UvicornFactory,
    postgres_database: str,
    redis_server: RedisServer,
    redis_client: object,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key_path = tmp_path / "signing-key.pem"
    first = serve_postgres(uvicorn_factory, postgres_database, redis_server.url, key_path)
    # Started after the first wrote the key file, so both sign with the same key.
    second = serve_postgres(uvicorn_factory, postgres_database, redis_server.url, key_path)
    token = cli_output(
        ["verifier", "enrollment-token", "create", "--postgres", postgres_database], capsys
    ).strip()
    key = make_key("ES256")

    enrolled = httpx.post(first.url + "/v1/enroll", timeout=10, json={
        "csr": make_csr(key).decode(), "enrollment_token": token,
        "backend": "software", "hardware_backed": False,
    })
    challenge = httpx.post(second.url + "/v1/challenges", timeout=10, json={
        "device_id": device_id_of(key), "audience": HTTP_ISSUER,
    })
    assertion = build_assertion(
        key, Challenge.from_json(challenge.json()), channel_binding=None, htm="POST",
        htu=HTTP_ISSUER + "/v1/token",
    )
    issued = httpx.post(first.url + "/v1/token", json={"assertion": assertion}, timeout=10)
    replayed = httpx.post(second.url + "/v1/token", json={"assertion": assertion}, timeout=10)
    whoami = httpx.get(
        second.url + "/v1/whoami", timeout=10,
        headers={"Authorization": f"Bearer {issued.json()['access_token']}"},
    )
    listed = json.loads(cli_output(
        ["verifier", "devices", "list", "--postgres", postgres_database, "--json"], capsys
    ))
    shown_record = json.loads(cli_output(
        ["verifier", "devices", "show", "--postgres", postgres_database, device_id_of(key),
         "--json"], capsys,
    ))
    revoked = cli_output(
        ["verifier", "devices", "revoke", "--postgres", postgres_database, "--redis",
         redis_server.url, device_id_of(key)], capsys,
    )
    after_revoke = httpx.post(second.url + "/v1/challenges", timeout=10, json={
        "device_id": device_id_of(key), "audience": HTTP_ISSUER,
    })
    whoami_after = httpx.get(
        first.url + "/v1/whoami", timeout=10,
        headers={"Authorization": f"Bearer {issued.json()['access_token']}"},
    )

    assert enrolled.status_code == 201, enrolled.text
    assert enrolled.json()["device"]["device_id"] == device_id_of(key)
    assert challenge.status_code == 200, challenge.text
    assert issued.status_code == 200, issued.text
    assert issued.json()["token_type"] == "Bearer"
    assert replayed.status_code == 401
    assert whoami.status_code == 200, whoami.text
    assert whoami.json()["device_id"] == device_id_of(key)
    assert [record["device_id"] for record in listed] == [device_id_of(key)]
    assert shown_record["status"] == "active"
    assert shown_record["device_id"] == device_id_of(key)
    assert revoked.startswith(f"revoked {device_id_of(key)} at ")
    assert after_revoke.status_code == 401
    assert whoami_after.status_code == 401
    log = first.process.log_path.read_text()
    assert "registry in PostgreSQL, challenges in Redis" in log
    assert "reason=replayed" in second.process.log_path.read_text()


def test_cli_show_unknown_device_postgres(
    postgres_database: str, postgres_server: Postgres, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli_main(
        ["verifier", "devices", "show", "--postgres", postgres_database, "x" * 43]
    )

    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith(
        f"device-sdk: error: device {'x' * 43} is not enrolled in the PostgreSQL registry at "
        f"{HOST}:{postgres_server.port}/"
    )


def test_cli_unreachable_postgres(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    status = cli_main(
        ["verifier", "devices", "list", "--postgres", f"postgresql://nobody@{HOST}:{port}/d"]
    )

    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith(
        f"device-sdk: error: cannot connect to the PostgreSQL registry at {HOST}:{port}/d: "
    )
    assert err.count("\n") == 1


def test_role_without_create_privilege(postgres_server: Postgres, postgres_database: str) -> None:
    # PostgreSQL 15 lets only the database owner create tables in public. A role with table
    # privileges works once the owner has created them, and without them gets a clear error.
    name = postgres_database.rsplit("/", 1)[1]
    with psycopg.connect(postgres_database, autocommit=True, connect_timeout=10) as owner:
        owner.execute("CREATE ROLE limited_verifier LOGIN")
    try:
        limited_url = postgres_database.replace(
            f"//{postgres_server.user}@", "//limited_verifier@"
        )
        with pytest.raises(ConfigError) as caught:
            PostgresDeviceRegistry(limited_url)
        assert str(caught.value) == (
            f"the PostgreSQL registry at {HOST}:{postgres_server.port}/{name} has no tables "
            "devices, enrollment_tokens, device_certificates, pending_attestations, and this "
            "user may not create them; create the database with CREATE DATABASE <name> OWNER "
            "<this user>, or start once as its owner"
        )

        PostgresDeviceRegistry(postgres_database).close()
        with psycopg.connect(postgres_database, autocommit=True, connect_timeout=10) as owner:
            owner.execute(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public "
                "TO limited_verifier"
            )
        limited = PostgresDeviceRegistry(limited_url)
        try:
            limited.add_enrollment_token("t1", NOW, None)
            stored, created = limited.enroll("t1", device_record("d" * 43), NOW)
        finally:
            limited.close()
        assert created
        assert stored.device_id == "d" * 43
    finally:
        with psycopg.connect(postgres_database, autocommit=True, connect_timeout=10) as owner:
            owner.execute("REASSIGN OWNED BY limited_verifier TO CURRENT_USER")
            owner.execute("DROP OWNED BY limited_verifier")
            owner.execute("DROP ROLE limited_verifier")


def test_registry_connections_have_timeouts(postgres_database: str) -> None:
    registry = PostgresDeviceRegistry(postgres_database)
    try:
        with registry._connection() as connection:
            statement_timeout = connection.execute("SHOW statement_timeout").fetchone()
            user_timeout = connection.info.get_parameters().get("tcp_user_timeout")
    finally:
        registry.close()
    assert statement_timeout == ("10s",)
    assert user_timeout == "10000"
