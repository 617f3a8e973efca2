"""Challenge stores: where issued challenges wait, and are consumed exactly once.

Three implementations share the :class:`ChallengeStore` interface:

- :class:`MemoryChallengeStore`: one process, for tests and single-process demos.
- :class:`SQLiteChallengeStore`: the embedded default; several processes on one host may share
  the file (WAL mode, one-statement atomic consume, busy timeout).
- :class:`RedisChallengeStore`: several verifier replicas on several hosts.

A device has at most :data:`MAX_OUTSTANDING_CHALLENGES` unconsumed challenges: issuing another
drops its oldest one, so anyone who can request challenges cannot grow the store without bound.

A challenge is spent only by an assertion of the device it was issued to, for its audience,
before it expires. The store checks all three in the same atomic step, so an assertion carrying
another device's nonce leaves that device's challenge usable. A consumed challenge stays behind
as a spent marker until its expiry plus :data:`SPENT_RETENTION`, so a second use is reported as
``replayed`` and not as ``unknown_nonce``.
Replay protection keys on the nonce (and, for assertions without a nonce, on ``jti``), never on
signature bytes: ECDSA signatures are malleable, so (r, n-s) verifies as well as (r, s).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlsplit

from device_sdk.auth.challenge import Challenge
from device_sdk.errors import ConfigError, StoreError
from device_sdk.verifier.ratelimit import RateLimit, RedisTokenBucketLimiter
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

    checks_device_status: bool
    """True when a successful :meth:`consume` proves the device is active in the registry at
    that moment, so the verifier need not read the registry again to be sure."""

    def put(self, challenge: Challenge) -> bool:
        """Store a newly issued challenge under its nonce, and return whether it was stored.

        Only a store that checks device status rejects one, when the device is not active (and
        the SQLite store on a database where any process checks device status). If the
        device then has more than the store's ``max_outstanding`` unconsumed challenges
        (:data:`MAX_OUTSTANDING_CHALLENGES` by default), the oldest ones are deleted.
        """

    def consume(self, nonce: str, device_id: str, audience: str, now: int) -> bool:
        """Atomically spend the challenge with this nonce, and return whether this call spent it.

        Only an unconsumed challenge issued to ``device_id`` for ``audience`` that has not
        expired at ``now`` is spent. Any other stays as it was. Of any number of concurrent
        calls with one nonce, across processes for the shared stores, exactly one returns True.
        """

    def find(self, nonce: str) -> tuple[Challenge, bool] | None:
        """Return the challenge with this nonce and whether it was consumed, or None.

        The verifier calls this after a failed :meth:`consume`, to tell why it failed.
        """

    def purge_device(self, device_id: str) -> int:
        """Delete every unconsumed challenge of a device; return how many were deleted."""

    def remember_jti(self, jti: str, expires_at: int) -> bool:
        """Record an assertion id until ``expires_at``; return False if it was recorded before."""

    def close(self) -> None:
        """Release connections."""


class MemoryChallengeStore:
    """Challenges in a dict behind a lock: one process only."""

    checks_device_status = False

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
        self._spent: dict[str, Challenge] = {}
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
        self._spent = {n: c for n, c in self._spent.items() if c.expires_at > horizon}
        self._jtis = {j: e for j, e in self._jtis.items() if e > horizon}

    def put(self, challenge: Challenge) -> bool:
        with self._lock:
            self._sweep()
            self._challenges[challenge.nonce] = challenge
            outstanding = self._by_device.setdefault(challenge.device_id, {})
            outstanding[challenge.nonce] = None
            while len(outstanding) > self._max_outstanding:
                oldest = next(iter(outstanding))
                del outstanding[oldest]
                self._challenges.pop(oldest, None)
            return True

    def consume(self, nonce: str, device_id: str, audience: str, now: int) -> bool:
        with self._lock:
            challenge = self._challenges.get(nonce)
            if (
                challenge is None
                or challenge.device_id != device_id
                or challenge.audience != audience
                or challenge.expires_at < now
            ):
                return False
            del self._challenges[nonce]
            self._spent[nonce] = challenge
            self._by_device.get(device_id, {}).pop(nonce, None)
            return True

    def find(self, nonce: str) -> tuple[Challenge, bool] | None:
        with self._lock:
            challenge = self._challenges.get(nonce)
            if challenge is not None:
                return challenge, False
            spent = self._spent.get(nonce)
            return None if spent is None else (spent, True)

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


# Keep "an unconsumed challenge belongs to an active device" true at every commit, for every
# writer: this code with or without check_device_status, an older release, or SQL by hand.
# A challenge of a device that is not active is not inserted (RAISE(IGNORE) skips the row), and
# a device that stops being active, changes its id or is deleted loses its pending challenges in
# the same transaction. INSERT OR REPLACE of a device fires no delete trigger, so the insert
# trigger covers it. The last DELETE clears rows written before the triggers existed.
_DEVICE_STATUS_TRIGGERS = """
BEGIN IMMEDIATE;
CREATE TRIGGER IF NOT EXISTS challenges_insert_for_active_device BEFORE INSERT ON challenges
WHEN NOT EXISTS (SELECT 1 FROM devices WHERE device_id = NEW.device_id AND status = 'active')
BEGIN
    SELECT RAISE(IGNORE);
END;
CREATE TRIGGER IF NOT EXISTS challenges_purge_on_device_update AFTER UPDATE ON devices
WHEN NEW.status != 'active' OR NEW.device_id != OLD.device_id
BEGIN
    DELETE FROM challenges WHERE device_id = OLD.device_id AND consumed = 0;
END;
CREATE TRIGGER IF NOT EXISTS challenges_purge_on_inactive_insert AFTER INSERT ON devices
WHEN NEW.status != 'active'
BEGIN
    DELETE FROM challenges WHERE device_id = NEW.device_id AND consumed = 0;
END;
CREATE TRIGGER IF NOT EXISTS challenges_purge_on_delete AFTER DELETE ON devices
BEGIN
    DELETE FROM challenges WHERE device_id = OLD.device_id AND consumed = 0;
END;
DELETE FROM challenges WHERE consumed = 0 AND device_id NOT IN
    (SELECT device_id FROM devices WHERE status = 'active');
COMMIT;
"""


class SQLiteChallengeStore:
    """Challenges in a SQLite table; processes on one host may share the file.

    ``consume`` is one ``UPDATE ... WHERE consumed = 0 AND ...`` statement. SQLite runs it
    under the database write lock, so exactly one of several concurrent calls, in any process,
    finds the row with ``consumed = 0``. The row stays as the spent marker. The statement
    returns nothing: the caller knows the challenge's device and audience already, and
    ``RETURNING`` would add about 1.3 µs to its 11 µs.

    ``path`` is the database file, or the ``connections`` of the :class:`SQLiteDeviceRegistry`
    on the same file, which lets the registry cache records (see its ``get``).

    On such a shared database, ``check_device_status`` installs triggers that make the database
    itself keep one invariant: an unconsumed challenge belongs to an active device. A challenge
    is inserted only while its device is active in the registry's ``devices`` table, and a
    device's unconsumed challenges are deleted in the very transaction that revokes or deletes
    it. The triggers bind every writer of the file, in any process: this class with or without
    the check, an older release, the CLI, SQL by hand. So a successful ``consume`` proves the
    device active without reading the registry, whatever the verifier has cached.
    """

    def __init__(
        self,
        path: str | Path | ThreadConnections,
        clock: Callable[[], float] = time.time,
        *,
        max_outstanding: int = MAX_OUTSTANDING_CHALLENGES,
        check_device_status: bool = False,
    ) -> None:
        self._clock = clock
        self._max_outstanding = max_outstanding
        self._connections = open_connections(path, _CHALLENGE_SCHEMA)
        self._puts = 0
        self.checks_device_status = check_device_status
        if check_device_status:
            connection = self._connections.get()
            devices_table = connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'devices'"
            ).fetchone()
            if devices_table is None:
                raise ConfigError(
                    f"{self._connections.path} has no devices table to check device status "
                    "in; open the SQLiteDeviceRegistry first and pass its connections"
                )
            try:
                connection.executescript(_DEVICE_STATUS_TRIGGERS)
            except sqlite3.Error:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    @property
    def connections(self) -> ThreadConnections:
        """The per-thread connections, to pass to the other store on the same file."""
        return self._connections

    def put(self, challenge: Challenge) -> bool:
        connection = self._connections.get()
        # The triggers of check_device_status, if any process installed them, skip the row of
        # a device that is not active.
        cursor = connection.execute(
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
        if cursor.rowcount != 1:
            return False
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
        return True

    def _sweep(self, connection: sqlite3.Connection) -> None:
        horizon = int(self._clock()) - SPENT_RETENTION
        connection.execute("DELETE FROM challenges WHERE expires_at < ?", (horizon,))
        connection.execute("DELETE FROM assertion_ids WHERE expires_at < ?", (horizon,))

    def consume(self, nonce: str, device_id: str, audience: str, now: int) -> bool:
        cursor = self._connections.get().execute(
            "UPDATE challenges SET consumed = 1 WHERE nonce = ? AND consumed = 0 "
            "AND device_id = ? AND audience = ? AND expires_at >= ?",
            (nonce, device_id, audience, now),
        )
        return cursor.rowcount == 1

    def find(self, nonce: str) -> tuple[Challenge, bool] | None:
        row = (
            self._connections.get()
            .execute(
                "SELECT device_id, audience, server_time, expires_at, consumed "
                "FROM challenges WHERE nonce = ?",
                (nonce,),
            )
            .fetchone()
        )
        if row is None:
            return None
        return Challenge(nonce, row[0], row[1], row[2], row[3]), bool(row[4])

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


# A challenge key contains the challenge's JSON. Consuming it prefixes the value with _SPENT,
# which marks it spent and keeps the challenge readable for find(). Versions up to commit
# cec9bcb marked a spent key with an empty value, which the scripts and find() also read as
# spent.
_SPENT = "!"

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
    if value and value ~= '' and string.sub(value, 1, 1) ~= '!' then
        redis.call('DEL', key)
        dropped = dropped + 1
    end
end
return dropped
"""

# Deletes the unconsumed challenges of one device. A spent marker (a value starting with "!")
# stays, so that a replay is still reported as such. The challenge keys are derived inside the
# script, so this needs all keys on one Redis node (no Redis Cluster).
_PURGE_DEVICE_SCRIPT = """
local purged = 0
for _, nonce in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local key = ARGV[1] .. nonce
    local value = redis.call('GET', key)
    if value and value ~= '' and string.sub(value, 1, 1) ~= '!' then
        redis.call('DEL', key)
        purged = purged + 1
    end
end
redis.call('DEL', KEYS[1])
return purged
"""

# Spends a challenge if it is unconsumed, of device ARGV[1], for audience ARGV[2] and not expired
# at ARGV[3]. It is one script, so no other client runs between the check and the write.
_CONSUME_SCRIPT = """
local value = redis.call('GET', KEYS[1])
if not value or value == '' or string.sub(value, 1, 1) == '!' then
    return 0
end
local challenge = cjson.decode(value)
if challenge['device_id'] ~= ARGV[1] or challenge['audience'] ~= ARGV[2]
        or challenge['expires_at'] < tonumber(ARGV[3]) then
    return 0
end
redis.call('SET', KEYS[1], '!' .. value, 'KEEPTTL')
return 1
"""


REDIS_TIMEOUT_S = 10
"""Seconds a Redis connection or command may take before it fails with StoreError."""

REDIS_PASSWORD_ENV = "REDISCLI_AUTH"  # noqa: S105 - the name of a variable, not a password
"""Environment variable with the Redis password, the one ``redis-cli`` reads too."""


def check_redis_url(url: str) -> None:
    """Raise :class:`ConfigError` if a Redis URL from a command line contains a password.

    Every local user can read a command line, so the password goes in :data:`REDIS_PASSWORD_ENV`.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"the Redis URL must start with redis://, rediss:// or unix://, got {parts.scheme!r}"
        )
    if parts.password or "password" in parse_qs(parts.query):
        raise ConfigError(
            "the Redis URL contains a password, which other local users can read on a command "
            f"line; remove it and set {REDIS_PASSWORD_ENV} in the environment instead"
        )


def describe_redis_url(url: str) -> str:
    """Return ``host:port/db`` (or the socket path) of a Redis URL, without user or password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"


class RedisChallengeStore:
    """Challenges as Redis keys with a TTL; verifier replicas on several hosts may share them.

    ``consume`` is one Lua script: it checks the stored challenge and marks it spent in one
    atomic step (Redis runs a script with no other command in between), so exactly one of
    several concurrent calls spends it. ``KEEPTTL`` needs Redis 6.0 or later.
    """

    checks_device_status = False

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "device-sdk:",
        clock: Callable[[], float] = time.time,
        max_outstanding: int = MAX_OUTSTANDING_CHALLENGES,
        name: str = "Redis",
    ) -> None:
        self._redis = client
        self._name = name
        self._prefix = prefix
        self._clock = clock
        self._max_outstanding = max_outstanding
        # Registered scripts run by their SHA-1 (EVALSHA), sent in full only once.
        self._put_script = client.register_script(_PUT_SCRIPT)
        self._consume_script = client.register_script(_CONSUME_SCRIPT)
        self._purge_script = client.register_script(_PURGE_DEVICE_SCRIPT)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "device-sdk:") -> RedisChallengeStore:
        """Connect to Redis at ``url`` (``redis://host:port/db``).

        Without a password in ``url``, the one in the environment variable
        :data:`REDIS_PASSWORD_ENV` is used, if set.
        """
        import redis

        # Defaults only: options in the URL's query win over these keyword arguments.
        options: dict[str, Any] = {
            "socket_timeout": REDIS_TIMEOUT_S,
            "socket_connect_timeout": REDIS_TIMEOUT_S,
        }
        password = os.environ.get(REDIS_PASSWORD_ENV)
        if password and not urlsplit(url).password:
            options["password"] = password
        client = redis.Redis.from_url(url, **options)
        return cls(client, prefix=prefix, name=describe_redis_url(url))

    @contextmanager
    def _server_errors(self) -> Iterator[None]:
        """Turn a failed or unreachable Redis into :class:`StoreError`, naming the server."""
        import redis

        try:
            yield
        except (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.ReadOnlyError,
        ) as exc:
            # AuthenticationError is a ConnectionError, and ReadOnlyError comes from a replica
            # during a failover. The messages name no password.
            raise StoreError(
                f"Redis at {self._name} failed: {exc}; check that it runs, and that "
                f"{REDIS_PASSWORD_ENV} holds its password if it needs one"
            ) from exc

    def rate_limiter(self, limit: RateLimit, name: str) -> RedisTokenBucketLimiter:
        """Return token buckets named ``name`` in this Redis, shared by its other verifiers."""
        return RedisTokenBucketLimiter(
            self._redis, limit, name=name, prefix=self._prefix, errors=self._server_errors
        )

    def ping(self) -> None:
        """Send PING to Redis; raise :class:`StoreError` if it fails."""
        with self._server_errors():
            self._redis.ping()

    def _challenge_key(self, nonce: str) -> str:
        return f"{self._prefix}challenge:{nonce}"

    def _device_key(self, device_id: str) -> str:
        return f"{self._prefix}device-challenges:{device_id}"

    def _ttl(self, expires_at: int) -> int:
        return max(1, expires_at + SPENT_RETENTION - int(self._clock()))

    def put(self, challenge: Challenge) -> bool:
        value = json.dumps(challenge.to_json(), separators=(",", ":"))
        with self._server_errors():
            self._put_script(
                keys=[
                    self._challenge_key(challenge.nonce),
                    self._device_key(challenge.device_id),
                    f"{self._prefix}device-queue:{challenge.device_id}",
                ],
                args=[
                    value,
                    self._ttl(challenge.expires_at),
                    challenge.nonce,
                    self._max_outstanding,
                    f"{self._prefix}challenge:",
                ],
            )
        return True

    def consume(self, nonce: str, device_id: str, audience: str, now: int) -> bool:
        with self._server_errors():
            spent = self._consume_script(
                keys=[self._challenge_key(nonce)], args=[device_id, audience, now]
            )
        return bool(spent)

    def find(self, nonce: str) -> tuple[Challenge, bool] | None:
        with self._server_errors():
            raw: Any = self._redis.get(self._challenge_key(nonce))
        if raw is None:
            return None
        text = raw.decode("utf-8")
        if not text:
            # An older spent marker, without the challenge: only "consumed" is known.
            return Challenge(nonce, "", "", 0, 0), True
        consumed = text.startswith(_SPENT)
        data = json.loads(text[len(_SPENT) :] if consumed else text)
        challenge = Challenge(
            nonce, data["device_id"], data["audience"], data["server_time"], data["expires_at"]
        )
        return challenge, consumed

    def purge_device(self, device_id: str) -> int:
        # One script, so that a challenge consumed meanwhile keeps its spent marker.
        with self._server_errors():
            purged: Any = self._purge_script(
                keys=[self._device_key(device_id)], args=[f"{self._prefix}challenge:"]
            )
        return int(purged)

    def remember_jti(self, jti: str, expires_at: int) -> bool:
        with self._server_errors():
            created = self._redis.set(
                f"{self._prefix}jti:{jti}", "1", nx=True, ex=self._ttl(expires_at)
            )
        return bool(created)

    def close(self) -> None:
        self._redis.close()
