"""Challenge stores: where issued challenges wait, and are consumed exactly once.

Three implementations share the :class:`ChallengeStore` interface:

- :class:`MemoryChallengeStore`: one process, for tests and single-process demos.
- :class:`SQLiteChallengeStore`: the embedded default; several processes on one host may share
  the file (WAL mode, one-statement atomic consume, busy timeout).
- :class:`RedisChallengeStore`: several verifier replicas on several hosts.

A device has at most :data:`MAX_OUTSTANDING_CHALLENGES` unconsumed challenges: issuing another
drops its oldest one, so anyone who can request challenges cannot grow the store without bound.

A consumed challenge stays behind as a spent marker until its expiry plus
:data:`SPENT_RETENTION`, so a second use is reported as ``replayed`` and not as ``unknown_nonce``.
Replay protection keys on the nonce (and, for assertions without a nonce, on ``jti``), never on
signature bytes: ECDSA signatures are malleable, so (r, n-s) verifies as well as (r, s).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from device_sdk.auth.challenge import Challenge
from device_sdk.verifier.sqlite import ThreadConnections, open_connections

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

SPENT_RETENTION = 300
"""Seconds a consumed or expired challenge is kept after ``expires_at``, to tell replays apart."""

MAX_OUTSTANDING_CHALLENGES = 32
"""Unconsumed challenges kept per device; :meth:`ChallengeStore.put` drops the oldest beyond it.

Dropping the oldest, not refusing the newest, keeps a device able to log in while someone else
requests challenges in its name. The device loses its own challenge only if 32 more are issued
for it between its challenge request and its login, and the per-address limits slow that down.
"""


class ChallengeStore(Protocol):
    """Storage for issued challenges. Every method is safe to call from several threads."""

    def put(self, challenge: Challenge) -> None:
        """Store a newly issued challenge under its nonce.

        If the device then has more than the store's ``max_outstanding`` unconsumed challenges
        (:data:`MAX_OUTSTANDING_CHALLENGES` by default), the oldest ones are deleted.
        """

    def consume(self, nonce: str) -> Challenge | None:
        """Atomically take the challenge with this nonce, expired or not; None if there is none.

        Of any number of concurrent calls with one nonce, across processes for the shared
        stores, exactly one gets the challenge.
        """

    def was_consumed(self, nonce: str) -> bool:
        """Tell whether a challenge with this nonce was consumed before (a replay)."""

    def purge_device(self, device_id: str) -> int:
        """Delete every unconsumed challenge of a device; return how many were deleted."""

    def remember_jti(self, jti: str, expires_at: int) -> bool:
        """Record an assertion id until ``expires_at``; return False if it was recorded before."""

    def close(self) -> None:
        """Release connections."""


class MemoryChallengeStore:
    """Challenges in a dict behind a lock: one process only."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        max_outstanding: int = MAX_OUTSTANDING_CHALLENGES,
    ) -> None:
        self._clock = clock
        self._max_outstanding = max_outstanding
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        # The unconsumed nonces of each device, oldest first (dicts keep insertion order).
        self._by_device: dict[str, dict[str, None]] = {}
        self._spent: dict[str, int] = {}
        self._jtis: dict[str, int] = {}
        self._next_sweep = 0.0

    def _sweep(self) -> None:
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 10
        horizon = now - SPENT_RETENTION
        self._challenges = {n: c for n, c in self._challenges.items() if c.expires_at > horizon}
        self._by_device = {}
        for nonce, challenge in self._challenges.items():
            self._by_device.setdefault(challenge.device_id, {})[nonce] = None
        self._spent = {n: e for n, e in self._spent.items() if e > horizon}
        self._jtis = {j: e for j, e in self._jtis.items() if e > horizon}

    def put(self, challenge: Challenge) -> None:
        with self._lock:
            self._sweep()
            self._challenges[challenge.nonce] = challenge
            outstanding = self._by_device.setdefault(challenge.device_id, {})
            outstanding[challenge.nonce] = None
            while len(outstanding) > self._max_outstanding:
                oldest = next(iter(outstanding))
                del outstanding[oldest]
                self._challenges.pop(oldest, None)

    def consume(self, nonce: str) -> Challenge | None:
        with self._lock:
            challenge = self._challenges.pop(nonce, None)
            if challenge is not None:
                self._spent[nonce] = challenge.expires_at
                self._by_device.get(challenge.device_id, {}).pop(nonce, None)
            return challenge

    def was_consumed(self, nonce: str) -> bool:
        with self._lock:
            return nonce in self._spent

    def purge_device(self, device_id: str) -> int:
        with self._lock:
            nonces = [n for n, c in self._challenges.items() if c.device_id == device_id]
            for nonce in nonces:
                del self._challenges[nonce]
            self._by_device.pop(device_id, None)
            return len(nonces)

    def remember_jti(self, jti: str, expires_at: int) -> bool:
        with self._lock:
            self._sweep()
            if jti in self._jtis:
                return False
            self._jtis[jti] = expires_at
            return True

    def close(self) -> None:
        pass


_CHALLENGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS challenges (
    nonce TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    audience TEXT NOT NULL,
    server_time INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    consumed INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS challenges_device ON challenges (device_id);
CREATE INDEX IF NOT EXISTS challenges_expires ON challenges (expires_at);
CREATE TABLE IF NOT EXISTS assertion_ids (
    jti TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
"""


class SQLiteChallengeStore:
    """Challenges in a SQLite table; processes on one host may share the file.

    ``consume`` is one ``UPDATE ... WHERE consumed = 0 RETURNING`` statement. SQLite runs it
    under the database write lock, so exactly one of several concurrent calls, in any process,
    finds the row with ``consumed = 0``. The row stays as the spent marker.

    ``path`` is the database file, or the ``connections`` of the :class:`SQLiteDeviceRegistry`
    on the same file, which lets the registry cache records (see its ``get``).
    """

    def __init__(
        self,
        path: str | Path | ThreadConnections,
        clock: Callable[[], float] = time.time,
        *,
        max_outstanding: int = MAX_OUTSTANDING_CHALLENGES,
    ) -> None:
        self._clock = clock
        self._max_outstanding = max_outstanding
        self._connections = open_connections(path, _CHALLENGE_SCHEMA)
        self._puts = 0

    @property
    def connections(self) -> ThreadConnections:
        """The per-thread connections, to pass to the other store on the same file."""
        return self._connections

    def put(self, challenge: Challenge) -> None:
        connection = self._connections.get()
        connection.execute(
            "INSERT INTO challenges (nonce, device_id, audience, server_time, expires_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                challenge.nonce,
                challenge.device_id,
                challenge.audience,
                challenge.server_time,
                challenge.expires_at,
            ),
        )
        # Keep the new challenge and the max_outstanding - 1 other unconsumed ones that expire
        # last. Challenges that expire in the same second are dropped in no set order, and two
        # concurrent puts may leave one extra challenge until the next put of the device.
        connection.execute(
            "DELETE FROM challenges WHERE nonce IN (SELECT nonce FROM challenges "
            "WHERE device_id = ? AND consumed = 0 AND nonce != ? "
            "ORDER BY expires_at DESC LIMIT -1 OFFSET ?)",
            (challenge.device_id, challenge.nonce, self._max_outstanding - 1),
        )

        # Sweeping on every 64th put keeps the table small without a background thread.
        self._puts += 1
        if self._puts % 64 == 1:
            self._sweep(connection)

    def _sweep(self, connection: sqlite3.Connection) -> None:
        horizon = int(self._clock()) - SPENT_RETENTION
        connection.execute("DELETE FROM challenges WHERE expires_at < ?", (horizon,))
        connection.execute("DELETE FROM assertion_ids WHERE expires_at < ?", (horizon,))

    def consume(self, nonce: str) -> Challenge | None:
        row = (
            self._connections.get()
            .execute(
                "UPDATE challenges SET consumed = 1 WHERE nonce = ? AND consumed = 0 "
                "RETURNING device_id, audience, server_time, expires_at",
                (nonce,),
            )
            .fetchone()
        )
        if row is None:
            return None
        return Challenge(nonce, row[0], row[1], row[2], row[3])

    def was_consumed(self, nonce: str) -> bool:
        row = (
            self._connections.get()
            .execute("SELECT consumed FROM challenges WHERE nonce = ?", (nonce,))
            .fetchone()
        )
        return row is not None and bool(row[0])

    def purge_device(self, device_id: str) -> int:
        cursor = self._connections.get().execute(
            "DELETE FROM challenges WHERE device_id = ? AND consumed = 0", (device_id,)
        )
        return cursor.rowcount

    def remember_jti(self, jti: str, expires_at: int) -> bool:
        cursor = self._connections.get().execute(
            "INSERT OR IGNORE INTO assertion_ids (jti, expires_at) VALUES (?, ?)",
            (jti, expires_at),
        )
        return cursor.rowcount == 1

    def close(self) -> None:
        self._connections.close()


# Stores a challenge and queues its nonce for its device. Beyond ARGV[4] queued nonces, the oldest
# leave the queue and are deleted unless already consumed, so consumed nonces also hold places
# and a device has at most ARGV[4] unconsumed challenges. Like the purge script below, this
# derives challenge keys inside the script and so needs all keys on one Redis node.
_PUT_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[2])
local dropped = 0
while redis.call('LLEN', KEYS[3]) > tonumber(ARGV[4]) do
    local nonce = redis.call('LPOP', KEYS[3])
    redis.call('SREM', KEYS[2], nonce)
    local key = ARGV[5] .. nonce
    local value = redis.call('GET', key)
    if value and value ~= '' then
        redis.call('DEL', key)
        dropped = dropped + 1
    end
end
return dropped
"""

# Deletes the unconsumed challenges of one device; a spent marker (empty value) stays so that a
# replay is still reported as such. The challenge keys are derived inside the script, so this
# needs all keys on one Redis node (no Redis Cluster).
_PURGE_DEVICE_SCRIPT = """
local purged = 0
for _, nonce in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local key = ARGV[1] .. nonce
    local value = redis.call('GET', key)
    if value and value ~= '' then
        redis.call('DEL', key)
        purged = purged + 1
    end
end
redis.call('DEL', KEYS[1])
return purged
"""


class RedisChallengeStore:
    """Challenges as Redis keys with a TTL; verifier replicas on several hosts may share them.

    ``consume`` is one ``SET key "" KEEPTTL GET`` command (Redis 6.2 or later): it returns the
    stored challenge and leaves an empty spent marker in one atomic step, so exactly one of
    several concurrent calls gets the challenge.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "device-sdk:",
        clock: Callable[[], float] = time.time,
        max_outstanding: int = MAX_OUTSTANDING_CHALLENGES,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._clock = clock
        self._max_outstanding = max_outstanding

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "device-sdk:") -> RedisChallengeStore:
        """Connect to Redis at ``url`` (``redis://host:port/db``)."""
        import redis

        return cls(redis.Redis.from_url(url), prefix=prefix)

    def _challenge_key(self, nonce: str) -> str:
        return f"{self._prefix}challenge:{nonce}"

    def _device_key(self, device_id: str) -> str:
        return f"{self._prefix}device-challenges:{device_id}"

    def _ttl(self, expires_at: int) -> int:
        return max(1, expires_at + SPENT_RETENTION - int(self._clock()))

    def put(self, challenge: Challenge) -> None:
        value = json.dumps(challenge.to_json(), separators=(",", ":"))
        self._redis.eval(
            _PUT_SCRIPT,
            3,
            self._challenge_key(challenge.nonce),
            self._device_key(challenge.device_id),
            f"{self._prefix}device-queue:{challenge.device_id}",
            value,
            self._ttl(challenge.expires_at),
            challenge.nonce,
            self._max_outstanding,
            f"{self._prefix}challenge:",
        )

    def consume(self, nonce: str) -> Challenge | None:
        raw: Any = self._redis.set(self._challenge_key(nonce), "", keepttl=True, get=True, xx=True)
        if not raw:
            return None
        return Challenge.from_json(json.loads(raw))

    def was_consumed(self, nonce: str) -> bool:
        return self._redis.get(self._challenge_key(nonce)) == b""

    def purge_device(self, device_id: str) -> int:
        # One script, so that a challenge consumed meanwhile keeps its spent marker.
        purged: Any = self._redis.eval(
            _PURGE_DEVICE_SCRIPT,
            1,
            self._device_key(device_id),
            f"{self._prefix}challenge:",
        )
        return int(purged)

    def remember_jti(self, jti: str, expires_at: int) -> bool:
        created = self._redis.set(
            f"{self._prefix}jti:{jti}", "1", nx=True, ex=self._ttl(expires_at)
        )
        return bool(created)

    def close(self) -> None:
        self._redis.close()
