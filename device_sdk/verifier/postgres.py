"""The device registry in PostgreSQL, shared by several verifier replicas.

:class:`PostgresDeviceRegistry` has the semantics of
:class:`~device_sdk.verifier.registry.SQLiteDeviceRegistry`. Every
:meth:`~PostgresDeviceRegistry.get` reads the row, so a revocation committed by one replica is
seen by every other one at its next call. Only ``get_unconfirmed`` reads from a cache.
Concurrent writers are serialized with row locks (``SELECT ... FOR UPDATE``) and
``INSERT ... ON CONFLICT``, never by a read followed by a separate write.

Needs the ``postgres`` extra (psycopg 3).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from device_sdk.errors import ConfigError, StoreError, VerificationError
from device_sdk.verifier.registry import (
    ACTIVE,
    REVOKED,
    DeviceRecord,
    check_token,
    record_from_row,
    record_to_keep,
)

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10
"""Seconds to wait for a connection to the PostgreSQL server before failing."""

STATEMENT_TIMEOUT_MS = 10_000
"""Milliseconds a statement may run, and unacknowledged data may wait, before the call fails."""

# Key of the transaction-level advisory lock held while the schema is created, so that
# processes opening the same database at once do not both try to create a table. Without it,
# concurrent CREATE TABLE IF NOT EXISTS of one name failed with a unique violation on
# pg_type_typname_nsp_index (PostgreSQL 15). The value is arbitrary but fixed: the ASCII
# bytes of "devsdkrg".
_SCHEMA_LOCK_KEY = 0x6465_7673_646B_7267

_REGISTRY_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS devices (
        device_id TEXT PRIMARY KEY,
        algorithm TEXT NOT NULL,
        public_key_pem TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
        backend TEXT NOT NULL,
        hardware_backed BOOLEAN NOT NULL,
        enrolled_at BIGINT NOT NULL,
        revoked_at BIGINT,
        attested BOOLEAN NOT NULL DEFAULT FALSE
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS enrollment_tokens (
        token_hash TEXT PRIMARY KEY,
        created_at BIGINT NOT NULL,
        expires_at BIGINT,
        used_by TEXT,
        used_at BIGINT
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS device_certificates (
        device_id TEXT PRIMARY KEY,
        certificate_pem TEXT NOT NULL,
        issued_at BIGINT NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS pending_attestations (
        token_hash TEXT PRIMARY KEY,
        data TEXT NOT NULL,
        expires_at BIGINT NOT NULL
    )
    """,
)

_RECORD_CACHE_SIZE = 10_000

_TABLES = ("devices", "enrollment_tokens", "device_certificates", "pending_attestations")

_SELECT_DEVICES = (
    "SELECT device_id, algorithm, public_key_pem, status, backend, hardware_backed, enrolled_at, "
    "revoked_at, attested FROM devices"
)


def describe_postgres_url(url: str) -> str:
    """Return ``host:port/dbname`` of a connection string for messages: no user, no password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(unparsable connection string)"
    host = parts.get("host") or parts.get("hostaddr") or "local socket"
    port = parts.get("port") or "5432"
    dbname = parts.get("dbname") or "default database"
    return f"{host}:{port}/{dbname}"


def check_postgres_url(url: str) -> None:
    """Raise :class:`ConfigError` unless ``url`` is a ``postgresql://`` URL without a password.

    For URLs that come from a command line, where every local user can read them. libpq reads
    the password from ``PGPASSWORD``, ``PGPASSFILE`` or ``~/.pgpass`` instead.
    """
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            "the PostgreSQL registry needs a URL such as postgresql://user@host:5432/dbname, "
            "got one that does not start with postgresql://"
        )
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        # The message of psycopg may repeat the URL, and so the password: leave it out, also
        # from the traceback that --debug shows.
        raise ConfigError(
            "the PostgreSQL URL is invalid; write it as postgresql://user@host:5432/dbname"
        ) from None
    if parts.get("password"):
        raise ConfigError(
            "the PostgreSQL URL contains a password, which other local users can read on a "
            "command line; remove it and give the password in PGPASSWORD, a PGPASSFILE or "
            "~/.pgpass (libpq reads them)"
        )


class _ThreadConnections:
    """One autocommit psycopg connection per thread, opened on first use and after a failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.target = describe_postgres_url(url)
        # Defaults for what the URL leaves out: a statement that runs too long is cancelled by
        # the server, and a server that stops acknowledging data fails the call on this side.
        url_options = conninfo_to_dict(url)
        self._options: dict[str, Any] = {}
        if "options" not in url_options:
            self._options["options"] = f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
        if "tcp_user_timeout" not in url_options:
            self._options["tcp_user_timeout"] = STATEMENT_TIMEOUT_MS
        self._local = threading.local()
        self._all: set[psycopg.Connection[tuple[Any, ...]]] = set()
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> psycopg.Connection[tuple[Any, ...]]:
        connection: psycopg.Connection[tuple[Any, ...]] | None = getattr(
            self._local, "connection", None
        )
        if connection is not None and not connection.closed and not connection.broken:
            return connection
        if connection is not None:
            self.discard()
        if self._closed:
            raise StoreError(f"the PostgreSQL registry at {self.target} was closed")

        try:
            connection = psycopg.connect(
                self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **self._options
            )
        except psycopg.OperationalError as exc:
            raise StoreError(
                f"cannot connect to the PostgreSQL registry at {self.target}: "
                f"{_first_line(exc)}; check that the server runs and accepts this user, with "
                "its password in PGPASSWORD, a PGPASSFILE or ~/.pgpass if it needs one"
            ) from exc
        self._local.connection = connection
        with self._lock:
            self._all.add(connection)
        return connection

    def discard(self) -> None:
        """Close this thread's connection, so that the next :meth:`get` opens a new one."""
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is None:
            return
        with self._lock:
            self._all.discard(connection)
        connection.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._all)
            self._all.clear()
        for connection in connections:
            connection.close()
        self._local = threading.local()


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class PostgresDeviceRegistry:
    """Device records and enrollment tokens in PostgreSQL, shared by verifier replicas.

    ``url`` is a libpq connection string, usually ``postgresql://user@host:5432/dbname``. The
    tables are created at open if missing. Each thread uses its own connection. When the
    connection fails (for example, the server restarted), the call raises
    :class:`~device_sdk.errors.StoreError` and the thread's next call connects again. A failed
    call is not retried, because it may have been committed before the connection dropped.
    """

    def __init__(self, url: str) -> None:
        self._connections = _ThreadConnections(url)
        self._active_records: dict[str, DeviceRecord] = {}
        try:
            self._open_schema()
        except BaseException:
            self._connections.close()
            raise
        logger.info("device registry opened in PostgreSQL at %s", self._connections.target)

    def _open_schema(self) -> None:
        with self._connection() as connection:
            # A role with only table privileges can run once the owner has created the tables,
            # so CREATE runs only when one is missing.
            missing = [
                name
                for name in _TABLES
                if connection.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,)
            ]
            if missing:
                self._create_schema(connection, missing)

    def _create_schema(
        self, connection: psycopg.Connection[tuple[Any, ...]], missing: list[str]
    ) -> None:
        try:
            with connection.transaction():
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
                for statement in _REGISTRY_SCHEMA:
                    connection.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            raise ConfigError(
                f"the PostgreSQL registry at {self._connections.target} has no tables "
                f"{', '.join(missing)}, and this user may not create them; create the database "
                "with CREATE DATABASE <name> OWNER <this user>, or start once as its owner"
            ) from None

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """Yield this thread's connection; turn a connection failure into :class:`StoreError`."""
        connection = self._connections.get()
        try:
            yield connection
        except (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction) as exc:
            # A broken connection cannot run anything more: drop it, so the next call opens a
            # new one. Any other error leaves the connection usable, as it was. A read-only
            # transaction means the connection reached a standby, as during a failover.
            reconnect = (
                connection.broken
                or connection.closed
                or isinstance(exc, psycopg.errors.ReadOnlySqlTransaction)
            )
            if reconnect:
                self._connections.discard()
            logger.warning(
                "PostgreSQL registry at %s: %s%s",
                self._connections.target,
                _first_line(exc),
                "; the next call reconnects" if reconnect else "",
            )
            raise StoreError(
                f"the PostgreSQL registry at {self._connections.target} failed: "
                f"{_first_line(exc)}"
            ) from exc

    def get(self, device_id: str) -> DeviceRecord | None:
        with self._connection() as connection:
            row = connection.execute(
                _SELECT_DEVICES + " WHERE device_id = %s", (device_id,)
            ).fetchone()
        return None if row is None else record_from_row(row)

    def get_unconfirmed(self, device_id: str) -> DeviceRecord | None:
        # Active records are cached for this only: the verifier reads the device's status
        # with get after it spends the nonce, and a device's key never changes.
        cached = self._active_records.get(device_id)
        if cached is not None:
            return cached
        record = self.get(device_id)
        if record is not None and record.active:
            if len(self._active_records) >= _RECORD_CACHE_SIZE:
                self._active_records.clear()
            self._active_records[device_id] = record
        return record

    def list_devices(self) -> list[DeviceRecord]:
        # COLLATE "C" orders device ids bytewise, as SQLite does, whatever the database locale.
        with self._connection() as connection:
            rows = connection.execute(
                _SELECT_DEVICES + ' ORDER BY enrolled_at, device_id COLLATE "C"'
            ).fetchall()
        return [record_from_row(row) for row in rows]

    def set_status(self, device_id: str, status: str, now: int) -> DeviceRecord | None:
        if status not in (ACTIVE, REVOKED):
            raise ValueError(f"device status {status!r} is neither {ACTIVE!r} nor {REVOKED!r}")
        revoked_at = now if status == REVOKED else None
        with self._connection() as connection:
            row = connection.execute(
                # A second revocation keeps the time of the first.
                "UPDATE devices SET status = %s, revoked_at = "
                "CASE WHEN status = 'revoked' AND %s = 'revoked' THEN revoked_at ELSE %s END "
                "WHERE device_id = %s "
                "RETURNING device_id, algorithm, public_key_pem, status, backend, "
                "hardware_backed, enrolled_at, revoked_at, attested",
                (status, status, revoked_at, device_id),
            ).fetchone()
        return None if row is None else record_from_row(row)

    def add_enrollment_token(
        self, token_hash: str, created_at: int, expires_at: int | None
    ) -> None:
        with self._connection() as connection:
            connection.execute(
                "INSERT INTO enrollment_tokens (token_hash, created_at, expires_at) "
                "VALUES (%s, %s, %s)",
                (token_hash, created_at, expires_at),
            )

    def enroll(self, token_hash: str, record: DeviceRecord, now: int) -> tuple[DeviceRecord, bool]:
        with self._connection() as connection, connection.transaction():
            return self._enroll_locked(connection, token_hash, record, now)

    def _enroll_locked(
        self,
        connection: psycopg.Connection[tuple[Any, ...]],
        token_hash: str,
        record: DeviceRecord,
        now: int,
    ) -> tuple[DeviceRecord, bool]:
        # FOR UPDATE locks the token row until commit, so enrollments with one token run one
        # after another: the second reads the used_by that the first committed.
        token = connection.execute(
            "SELECT expires_at, used_by FROM enrollment_tokens WHERE token_hash = %s FOR UPDATE",
            (token_hash,),
        ).fetchone()
        # Locks the device row too, so that a revocation cannot commit in between.
        existing = self._locked_device(connection, record.device_id)
        enrolled = record_to_keep(token, existing, record.device_id, now)
        if enrolled is not None:
            return self._mark_attested(connection, enrolled, record), False

        # The same key may be enrolling with another token at this moment. The insert waits
        # for that transaction, and if it committed, inserts nothing. This token then stays
        # unspent, as above.
        inserted = connection.execute(
            "INSERT INTO devices (device_id, algorithm, public_key_pem, status, backend, "
            "hardware_backed, enrolled_at, revoked_at, attested) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (device_id) DO NOTHING RETURNING device_id",
            (
                record.device_id,
                record.algorithm,
                record.public_key_pem,
                record.status,
                record.backend,
                record.hardware_backed,
                record.enrolled_at,
                record.revoked_at,
                record.attested,
            ),
        ).fetchone()
        if inserted is None:
            concurrent = self._locked_device(connection, record.device_id)
            if concurrent is None:
                raise StoreError(
                    f"device {record.device_id} was enrolled and deleted during this enrollment; "
                    "try again"
                )
            if not concurrent.active:
                raise VerificationError(
                    "revoked_device",
                    "a revoked device cannot enroll again",
                    device_id=record.device_id,
                )
            return self._mark_attested(connection, concurrent, record), False

        connection.execute(
            "UPDATE enrollment_tokens SET used_by = %s, used_at = %s WHERE token_hash = %s",
            (record.device_id, now, token_hash),
        )
        return record, True

    def _locked_device(
        self, connection: psycopg.Connection[tuple[Any, ...]], device_id: str
    ) -> DeviceRecord | None:
        row = connection.execute(
            _SELECT_DEVICES + " WHERE device_id = %s FOR UPDATE", (device_id,)
        ).fetchone()
        return None if row is None else record_from_row(row)

    def _mark_attested(
        self,
        connection: psycopg.Connection[tuple[Any, ...]],
        existing: DeviceRecord,
        record: DeviceRecord,
    ) -> DeviceRecord:
        """Record a new attestation of an enrolled key; the other fields stay as enrolled."""
        if not record.attested or existing.attested:
            return existing
        connection.execute(
            "UPDATE devices SET attested = TRUE WHERE device_id = %s", (existing.device_id,)
        )
        return replace(existing, attested=True)

    def check_enrollment_token(self, token_hash: str, device_id: str, now: int) -> None:
        with self._connection() as connection:
            token = connection.execute(
                "SELECT expires_at, used_by FROM enrollment_tokens WHERE token_hash = %s",
                (token_hash,),
            ).fetchone()
        check_token(token, device_id, now)

    def device_certificate(self, device_id: str) -> str | None:
        with self._connection() as connection:
            row = connection.execute(
                "SELECT certificate_pem FROM device_certificates WHERE device_id = %s",
                (device_id,),
            ).fetchone()
        return None if row is None else str(row[0])

    def store_device_certificate(self, device_id: str, certificate_pem: str, now: int) -> str:
        # Of two enrollments of one key racing here, the first certificate committed stays.
        with self._connection() as connection:
            connection.execute(
                "INSERT INTO device_certificates (device_id, certificate_pem, issued_at) "
                "VALUES (%s, %s, %s) ON CONFLICT (device_id) DO NOTHING",
                (device_id, certificate_pem, now),
            )
        stored = self.device_certificate(device_id)
        if stored is None:
            raise StoreError(f"the certificate of {device_id} was not stored")
        return stored

    def put_pending_attestation(
        self, token_hash: str, data: str, expires_at: int, now: int
    ) -> None:
        with self._connection() as connection, connection.transaction():
            connection.execute("DELETE FROM pending_attestations WHERE expires_at < %s", (now,))
            connection.execute(
                "INSERT INTO pending_attestations (token_hash, data, expires_at) "
                "VALUES (%s, %s, %s) ON CONFLICT (token_hash) "
                "DO UPDATE SET data = EXCLUDED.data, expires_at = EXCLUDED.expires_at",
                (token_hash, data, expires_at),
            )

    def take_pending_attestation(self, token_hash: str) -> tuple[str, int] | None:
        # DELETE ... RETURNING takes the state atomically, so two enrollments cannot both use it.
        with self._connection() as connection:
            row = connection.execute(
                "DELETE FROM pending_attestations WHERE token_hash = %s RETURNING data, expires_at",
                (token_hash,),
            ).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    def close(self) -> None:
        self._connections.close()
