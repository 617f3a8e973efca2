"""Challenge stores: the same contract for memory, SQLite and Redis, and single use under load."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fixtures_services import free_port
from fixtures_verifier import (
    HTTP_CB,
    ISSUER,
    TOKEN_URL,
    ManualClock,
    enroll,
    verifier_config,
)

from device_sdk.auth import Challenge, b64url_encode, build_assertion
from device_sdk.errors import ConfigError, StoreError, VerificationError
from device_sdk.verifier import (
    ChallengeStore,
    MemoryChallengeStore,
    RateLimit,
    RedisChallengeStore,
    RedisTokenBucketLimiter,
    SQLiteChallengeStore,
    SQLiteDeviceRegistry,
    Verifier,
)
from device_sdk.verifier.app import create_app
from device_sdk.verifier.stores import (
    MAX_OUTSTANDING_CHALLENGES,
    SPENT_RETENTION,
    check_redis_url,
)

PARALLEL_USES = 32


def make_challenge(number: int, device_id: str = "d" * 43, lifetime: int = 60) -> Challenge:
    now = int(time.time())
    nonce = b64url_encode(number.to_bytes(32, "big"))
    return Challenge(nonce, device_id, ISSUER, now, now + lifetime)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChallengeStore]:
    instance: ChallengeStore
    if request.param == "memory":
        instance = MemoryChallengeStore()
    elif request.param == "sqlite":
        instance = SQLiteChallengeStore(tmp_path / "challenges.db")
    else:
        client = request.getfixturevalue("redis_client")
        instance = RedisChallengeStore(client, prefix="test:")
    yield instance
    instance.close()


def consume(store: ChallengeStore, challenge: Challenge, now: int | None = None) -> bool:
    """Spend a challenge as its own device's assertion would."""
    when = int(time.time()) if now is None else now
    return store.consume(challenge.nonce, challenge.device_id, challenge.audience, when)


def test_consume_spends_challenge_once(store: ChallengeStore) -> None:
    challenge = make_challenge(1)
    assert store.put(challenge)
    assert consume(store, challenge)
    assert not consume(store, challenge)


def test_find_tells_consumed_from_pending(store: ChallengeStore) -> None:
    challenge = make_challenge(2)
    store.put(challenge)
    assert store.find(challenge.nonce) == (challenge, False)
    consume(store, challenge)
    assert store.find(challenge.nonce) == (challenge, True)


def test_unknown_nonce(store: ChallengeStore) -> None:
    assert not consume(store, make_challenge(3))
    assert store.find(make_challenge(3).nonce) is None


def test_expired_challenge_not_spent(store: ChallengeStore) -> None:
    now = int(time.time())
    challenge = Challenge(make_challenge(4).nonce, "d" * 43, ISSUER, now - 100, now - 40)
    store.put(challenge)
    assert not consume(store, challenge, now=now)
    # Still valid at its very last second.
    assert consume(store, challenge, now=now - 40)


def test_other_device_cannot_spend_challenge(store: ChallengeStore) -> None:
    # An assertion of device "e..." carrying this device's nonce leaves the challenge usable.
    challenge = make_challenge(5)
    store.put(challenge)
    now = int(time.time())
    assert not store.consume(challenge.nonce, "e" * 43, challenge.audience, now)
    assert not store.consume(challenge.nonce, challenge.device_id, "mqtts://other:8883", now)
    assert store.find(challenge.nonce) == (challenge, False)
    assert consume(store, challenge)


def test_purge_device(store: ChallengeStore) -> None:
    mine = [make_challenge(10 + i, "a" * 43) for i in range(3)]
    theirs = make_challenge(20, "b" * 43)
    for challenge in [*mine, theirs]:
        store.put(challenge)
    consume(store, mine[0])

    assert store.purge_device("a" * 43) == 2
    assert not consume(store, mine[1])
    assert store.find(mine[2].nonce) is None
    assert store.find(mine[0].nonce) == (mine[0], True)
    assert consume(store, theirs)


def test_redis_url_with_password_rejected() -> None:
    with pytest.raises(ConfigError) as caught:
        check_redis_url("redis://:hunter2@127.0.0.1:6379/0")
    assert str(caught.value) == (
        "the Redis URL contains a password, which other local users can read on a command "
        "line; remove it and set REDISCLI_AUTH in the environment instead"
    )
    assert "hunter2" not in str(caught.value)


def test_redis_url_password_parameter_rejected() -> None:
    with pytest.raises(ConfigError) as caught:
        check_redis_url("redis://127.0.0.1:6379/0?password=hunter2")
    assert "hunter2" not in str(caught.value)
    assert str(caught.value).startswith("the Redis URL contains a password")


def test_redis_old_spent_marker_read_as_spent(redis_client: Any) -> None:
    # Versions up to commit cec9bcb marked a spent challenge with an empty value.
    store = RedisChallengeStore(redis_client, prefix="old-marker:")
    challenge = make_challenge(9002)
    redis_client.set(f"old-marker:challenge:{challenge.nonce}", "", ex=60)

    assert not consume(store, challenge)
    found = store.find(challenge.nonce)
    assert found is not None
    assert found[1] is True


def test_redis_store_has_timeouts(redis_server: Any) -> None:
    store = RedisChallengeStore.from_url(redis_server.url)
    try:
        kwargs = store._redis.connection_pool.connection_kwargs
    finally:
        store.close()
    assert kwargs["socket_timeout"] == 10
    assert kwargs["socket_connect_timeout"] == 10


def test_redis_down_raises_store_error(tmp_path: Path) -> None:
    # Nothing listens on the port of a socket that was bound and closed again.
    port = free_port()
    store = RedisChallengeStore.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(StoreError) as caught:
            store.put(make_challenge(9001))
    finally:
        store.close()
    message = str(caught.value)
    assert message.startswith(f"Redis at 127.0.0.1:{port}/0 failed: ")
    assert message.endswith(
        "check that it runs, and that REDISCLI_AUTH holds its password if it needs one"
    )


def test_app_responds_503_while_redis_down(tmp_path: Path) -> None:
    registry = SQLiteDeviceRegistry(tmp_path / "verifier.db")
    challenges = RedisChallengeStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    verifier = Verifier(verifier_config(), registry=registry, challenges=challenges)
    device = enroll(verifier)
    try:
        with TestClient(create_app(verifier)) as client:
            response = client.post(
                "/v1/challenges", json={"device_id": device.device_id, "audience": ISSUER}
            )
    finally:
        verifier.close()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"error": "unavailable"}


def test_redis_password_from_environment(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDISCLI_AUTH", "from-the-environment")
    store = RedisChallengeStore.from_url(redis_server.url)
    try:
        kwargs = store._redis.connection_pool.connection_kwargs
    finally:
        store.close()
    assert kwargs["password"] == "from-the-environment"


def test_remember_jti(store: ChallengeStore) -> None:
    expires_at = int(time.time()) + 30
    assert store.remember_jti("jti-1", expires_at)
    assert not store.remember_jti("jti-1", expires_at)
    assert store.remember_jti("jti-2", expires_at)


def test_parallel_consume_single_winner(store: ChallengeStore) -> None:
    challenge = make_challenge(6)
    store.put(challenge)
    barrier = threading.Barrier(PARALLEL_USES)
    results: list[bool] = []
    lock = threading.Lock()

    def use() -> None:
        barrier.wait()
        result = consume(store, challenge)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=use) for _ in range(PARALLEL_USES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == PARALLEL_USES
    assert results.count(True) == 1


def test_memory_store_sweeps_old_entries() -> None:
    clock = ManualClock()
    store = MemoryChallengeStore(clock)
    old = Challenge(make_challenge(6).nonce, "d" * 43, ISSUER, int(clock.now), int(clock.now) + 60)
    store.put(old)
    clock.advance(60 + SPENT_RETENTION + 11)
    store.put(make_challenge(7))
    assert store.find(old.nonce) is None


def test_redis_challenge_expires_with_ttl(redis_client: Any) -> None:
    store = RedisChallengeStore(redis_client, prefix="ttl:")
    challenge = make_challenge(8)
    store.put(challenge)
    ttl = redis_client.ttl(f"ttl:challenge:{challenge.nonce}")
    assert 60 + SPENT_RETENTION - 2 <= ttl <= 60 + SPENT_RETENTION
    consume(store, challenge)
    # The spent marker keeps the challenge's TTL, so it does not live forever.
    assert redis_client.ttl(f"ttl:challenge:{challenge.nonce}") > 0


# The SQLite store on the registry's database, checking device status


@pytest.fixture
def shared_database(tmp_path: Path) -> Iterator[tuple[Verifier, SQLiteChallengeStore]]:
    """A verifier opened as Verifier.open opens it, and its challenge store."""
    verifier = Verifier.open(tmp_path / "verifier.db", verifier_config())
    assert isinstance(verifier.challenges, SQLiteChallengeStore)
    yield verifier, verifier.challenges
    verifier.close()


def test_status_check_rejects_unknown_device(
    shared_database: tuple[Verifier, SQLiteChallengeStore],
) -> None:
    _, store = shared_database
    assert store.checks_device_status
    challenge = make_challenge(4000)

    assert not store.put(challenge)
    assert store.find(challenge.nonce) is None


def test_status_check_rejects_revoked_device(
    shared_database: tuple[Verifier, SQLiteChallengeStore],
) -> None:
    verifier, store = shared_database
    device = enroll(verifier)
    verifier.registry.set_status(device.device_id, "revoked", verifier.now())
    challenge = make_challenge(4001, device.device_id)

    assert not store.put(challenge)
    assert store.find(challenge.nonce) is None


def test_sql_revocation_purges_pending_challenges(
    tmp_path: Path, shared_database: tuple[Verifier, SQLiteChallengeStore]
) -> None:
    # In any process, the triggers delete the pending challenges in the transaction that
    # revokes the device. The spent marker stays, so a replay is still reported as one.
    verifier, store = shared_database
    device = enroll(verifier)
    spent, pending = (make_challenge(4002 + i, device.device_id) for i in range(2))
    assert store.put(spent)
    assert store.put(pending)
    assert consume(store, spent)

    other = sqlite3.connect(tmp_path / "verifier.db", isolation_level=None)
    other.execute("UPDATE devices SET status = 'revoked' WHERE device_id = ?", (device.device_id,))
    other.close()

    assert store.find(pending.nonce) is None
    assert store.find(spent.nonce) == (spent, True)


def test_status_check_drops_older_pending_challenges(tmp_path: Path) -> None:
    # A database from before the triggers may hold a pending challenge of a device revoked by
    # set_status alone. Opening the store with the check deletes it.
    registry = SQLiteDeviceRegistry(tmp_path / "verifier.db")
    unchecked = SQLiteChallengeStore(registry.connections)
    connection = registry.connections.get()
    for device_id, status in (("a" * 43, "active"), ("r" * 43, "revoked")):
        connection.execute(
            "INSERT INTO devices (device_id, algorithm, public_key_pem, status, backend, "
            "hardware_backed, enrolled_at) VALUES (?, 'ES256', 'PEM', ?, 'software', 0, 0)",
            (device_id, status),
        )
    active = make_challenge(4005, "a" * 43)
    revoked = make_challenge(4006, "r" * 43)
    assert unchecked.put(active)
    assert unchecked.put(revoked)

    checked = SQLiteChallengeStore(registry.connections, check_device_status=True)

    assert checked.find(revoked.nonce) is None
    assert checked.find(active.nonce) == (active, False)
    checked.close()


def test_status_triggers_bind_unchecked_writers(
    tmp_path: Path, shared_database: tuple[Verifier, SQLiteChallengeStore]
) -> None:
    # A store without the check, or an older release, on the same file: the database itself
    # skips the challenge of a device that is not active.
    verifier, _ = shared_database
    device = enroll(verifier)
    verifier.registry.set_status(device.device_id, "revoked", verifier.now())
    unchecked = SQLiteChallengeStore(tmp_path / "verifier.db")
    challenge = make_challenge(4007, device.device_id)

    stored = unchecked.put(challenge)

    assert not stored
    assert unchecked.find(challenge.nonce) is None
    unchecked.close()


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT OR REPLACE INTO devices (device_id, algorithm, public_key_pem, status, backend, "
        "hardware_backed, enrolled_at) VALUES (?1, 'ES256', 'PEM', 'revoked', 'software', 0, 0)",
        "UPDATE devices SET device_id = 'x' || device_id WHERE device_id = ?1",
        "UPDATE devices SET status = 'revoked' WHERE device_id = ?1",
        "DELETE FROM devices WHERE device_id = ?1",
    ],
    ids=["insert-or-replace", "new-device-id", "revoke", "delete"],
)
def test_device_change_purges_pending_challenges(
    tmp_path: Path, shared_database: tuple[Verifier, SQLiteChallengeStore], statement: str
) -> None:
    verifier, store = shared_database
    device = enroll(verifier)
    pending = make_challenge(4008, device.device_id)
    assert store.put(pending)

    other = sqlite3.connect(tmp_path / "verifier.db", isolation_level=None)
    other.execute(statement, (device.device_id,))
    other.close()

    assert store.find(pending.nonce) is None


def test_status_check_without_registry_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        SQLiteChallengeStore(tmp_path / "challenges.db", check_device_status=True)
    assert str(caught.value) == (
        f"{tmp_path / 'challenges.db'} has no devices table to check device status in; open "
        "the SQLiteDeviceRegistry first and pass its connections"
    )


# Two verifier processes sharing one store


def _verify_in_process(
    db_path: str,
    redis_url: str | None,
    token: str,
    threads: int,
    barrier: Any,
    results: Any,
) -> None:
    verifier = Verifier.open(db_path, verifier_config(), redis_url=redis_url)
    outcomes: list[str] = []
    lock = threading.Lock()
    local_barrier = threading.Barrier(threads)

    def use() -> None:
        local_barrier.wait()
        try:
            verifier.verify_assertion(token, audience_kind="http")
            outcome = "accepted"
        except VerificationError as exc:
            outcome = exc.reason
        with lock:
            outcomes.append(outcome)

    workers = [threading.Thread(target=use) for _ in range(threads)]
    barrier.wait(timeout=60)
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    verifier.close()
    results.put(outcomes)


def run_two_verifier_processes(db_path: Path, redis_url: str | None) -> list[str]:
    parent = Verifier.open(db_path, verifier_config(), redis_url=redis_url)
    device = enroll(parent)
    challenge = Challenge.from_json(parent.issue_challenge(device.device_id, ISSUER))
    token = build_assertion(
        device.key, challenge, channel_binding=HTTP_CB, htm="POST", htu=TOKEN_URL
    )
    parent.close()

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    per_process = PARALLEL_USES // 2
    processes = [
        context.Process(
            target=_verify_in_process,
            args=(str(db_path), redis_url, token, per_process, barrier, results),
        )
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    outcomes: list[str] = []
    for _ in processes:
        outcomes.extend(results.get(timeout=120))
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    return outcomes


def test_two_processes_sqlite_single_winner(tmp_path: Path) -> None:
    outcomes = run_two_verifier_processes(tmp_path / "verifier.db", None)
    assert len(outcomes) == PARALLEL_USES
    assert outcomes.count("accepted") == 1
    assert outcomes.count("replayed") == PARALLEL_USES - 1


def test_two_processes_redis_single_winner(
    tmp_path: Path, redis_client: Any, redis_server: Any
) -> None:
    outcomes = run_two_verifier_processes(tmp_path / "verifier.db", redis_server.url)
    assert len(outcomes) == PARALLEL_USES
    assert outcomes.count("accepted") == 1
    assert outcomes.count("replayed") == PARALLEL_USES - 1


def test_outstanding_challenges_per_device_capped(store: ChallengeStore) -> None:
    # Each expires a second after the one before, because SQLite orders by expiry, in seconds.
    challenges = [
        make_challenge(1000 + number, lifetime=60 + number)
        for number in range(MAX_OUTSTANDING_CHALLENGES + 8)
    ]
    for challenge in challenges:
        store.put(challenge)
    other_device = make_challenge(2000, device_id="e" * 43)
    store.put(other_device)

    consumed = [consume(store, challenge) for challenge in challenges]

    assert consumed == [False] * 8 + [True] * MAX_OUTSTANDING_CHALLENGES
    assert consume(store, other_device)


def test_consumed_challenges_not_dropped_for_cap(store: ChallengeStore) -> None:
    first = make_challenge(3000)
    store.put(first)
    assert consume(store, first)
    for number in range(MAX_OUTSTANDING_CHALLENGES + 1):
        store.put(make_challenge(3001 + number))

    assert store.find(first.nonce) == (first, True)


# Rate limits shared through Redis


def test_redis_limiter_shared_between_instances(redis_client: Any) -> None:
    limit = RateLimit(capacity=3, per_second=0.01)
    first = RedisTokenBucketLimiter(redis_client, limit, name="shared", prefix="limits:")
    second = RedisTokenBucketLimiter(redis_client, limit, name="shared", prefix="limits:")

    acquired = [first.try_acquire("d1"), second.try_acquire("d1"), first.try_acquire("d1")]
    wait_after_budget = second.try_acquire("d1")
    waiting = first.retry_after("d1")

    assert acquired == [None, None, None]
    assert wait_after_budget is not None
    assert 99 < wait_after_budget <= 100
    assert waiting is not None
    assert 99 < waiting <= 100
    assert first.retry_after("d2") is None
    # Another name is another set of buckets.
    other = RedisTokenBucketLimiter(redis_client, limit, name="other", prefix="limits:")
    assert other.try_acquire("d1") is None


def test_redis_limiter_refills(redis_client: Any) -> None:
    limit = RateLimit(capacity=1, per_second=50.0)
    limiter = RedisTokenBucketLimiter(redis_client, limit, name="refill", prefix="limits:")
    assert limiter.try_acquire("d") is None
    wait = limiter.try_acquire("d")
    assert wait is not None
    deadline = time.monotonic() + 10
    while limiter.retry_after("d") is not None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert limiter.try_acquire("d") is None
    # The bucket expires once it would be full again.
    assert redis_client.ttl("limits:limit:refill:d") in (1, 2)


def test_replicas_share_failure_limit(tmp_path: Path, redis_server: Any) -> None:
    # Two verifiers on one Redis, as two replicas: failures at either count against one budget.
    config = verifier_config(failure_limit_per_address=RateLimit(capacity=4, per_second=0.01))
    replicas = [
        Verifier.open(tmp_path / "verifier.db", config, redis_url=redis_server.url)
        for _ in range(2)
    ]
    try:
        reasons = []
        for attempt in range(6):
            with pytest.raises(VerificationError) as caught:
                replicas[attempt % 2].verify_assertion(
                    "not.an.assertion", audience_kind="http", client_address="203.0.113.9"
                )
            reasons.append(caught.value.reason)
    finally:
        for replica in replicas:
            replica.close()
    assert reasons == ["malformed"] * 4 + ["rate_limited"] * 2
