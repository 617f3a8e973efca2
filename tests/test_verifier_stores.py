"""Challenge stores: the same contract for memory, SQLite and Redis, and single use under load."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_verifier import (
    HTTP_CB,
    ISSUER,
    TOKEN_URL,
    ManualClock,
    enroll,
    verifier_config,
)

from device_sdk.auth import Challenge, b64url_encode, build_assertion
from device_sdk.errors import VerificationError
from device_sdk.verifier import (
    ChallengeStore,
    MemoryChallengeStore,
    RedisChallengeStore,
    SQLiteChallengeStore,
    Verifier,
)
from device_sdk.verifier.stores import MAX_OUTSTANDING_CHALLENGES, SPENT_RETENTION

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


def test_consume_returns_challenge_once(store: ChallengeStore) -> None:
    challenge = make_challenge(1)
    store.put(challenge)
    assert store.consume(challenge.nonce) == challenge
    assert store.consume(challenge.nonce) is None


def test_consumed_nonce_remembered(store: ChallengeStore) -> None:
    challenge = make_challenge(2)
    store.put(challenge)
    assert not store.was_consumed(challenge.nonce)
    store.consume(challenge.nonce)
    assert store.was_consumed(challenge.nonce)


def test_unknown_nonce(store: ChallengeStore) -> None:
    assert store.consume(make_challenge(3).nonce) is None
    assert not store.was_consumed(make_challenge(3).nonce)


def test_expired_challenge_still_consumed(store: ChallengeStore) -> None:
    # The verifier, not the store, decides expiry, so it can report challenge_expired.
    now = int(time.time())
    challenge = Challenge(make_challenge(4).nonce, "d" * 43, ISSUER, now - 100, now - 40)
    store.put(challenge)
    assert store.consume(challenge.nonce) == challenge


def test_purge_device(store: ChallengeStore) -> None:
    mine = [make_challenge(10 + i, "a" * 43) for i in range(3)]
    theirs = make_challenge(20, "b" * 43)
    for challenge in [*mine, theirs]:
        store.put(challenge)
    store.consume(mine[0].nonce)

    assert store.purge_device("a" * 43) == 2
    assert store.consume(mine[1].nonce) is None
    assert store.consume(mine[2].nonce) is None
    assert store.was_consumed(mine[0].nonce)
    assert store.consume(theirs.nonce) == theirs


def test_remember_jti(store: ChallengeStore) -> None:
    expires_at = int(time.time()) + 30
    assert store.remember_jti("jti-1", expires_at)
    assert not store.remember_jti("jti-1", expires_at)
    assert store.remember_jti("jti-2", expires_at)


def test_parallel_consume_single_winner(store: ChallengeStore) -> None:
    challenge = make_challenge(5)
    store.put(challenge)
    barrier = threading.Barrier(PARALLEL_USES)
    results: list[Challenge | None] = []
    lock = threading.Lock()

    def use() -> None:
        barrier.wait()
        result = store.consume(challenge.nonce)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=use) for _ in range(PARALLEL_USES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == PARALLEL_USES
    assert results.count(challenge) == 1
    assert results.count(None) == PARALLEL_USES - 1


def test_memory_store_sweeps_old_entries() -> None:
    clock = ManualClock()
    store = MemoryChallengeStore(clock)
    old = Challenge(make_challenge(6).nonce, "d" * 43, ISSUER, int(clock.now), int(clock.now) + 60)
    store.put(old)
    clock.advance(60 + SPENT_RETENTION + 11)
    store.put(make_challenge(7))
    assert store.consume(old.nonce) is None


def test_redis_challenge_expires_with_ttl(redis_client: Any) -> None:
    store = RedisChallengeStore(redis_client, prefix="ttl:")
    challenge = make_challenge(8)
    store.put(challenge)
    ttl = redis_client.ttl(f"ttl:challenge:{challenge.nonce}")
    assert 60 + SPENT_RETENTION - 2 <= ttl <= 60 + SPENT_RETENTION
    store.consume(challenge.nonce)
    # The spent marker keeps the challenge's TTL, so it does not live forever.
    assert redis_client.ttl(f"ttl:challenge:{challenge.nonce}") > 0


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

    consumed = [store.consume(challenge.nonce) for challenge in challenges]

    assert consumed[:8] == [None] * 8
    assert consumed[8:] == challenges[8:]
    assert store.consume(other_device.nonce) == other_device


def test_consumed_challenges_not_dropped_for_cap(store: ChallengeStore) -> None:
    first = make_challenge(3000)
    store.put(first)
    assert store.consume(first.nonce) == first
    for number in range(MAX_OUTSTANDING_CHALLENGES + 1):
        store.put(make_challenge(3001 + number))

    assert store.was_consumed(first.nonce)
