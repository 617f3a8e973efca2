"""The device registry: enrolled devices and one-time enrollment tokens.

Enrollment tokens are stored only as SHA-256 hashes, so a copy of the database does not let
anyone enroll a device.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from device_sdk.errors import VerificationError
from device_sdk.verifier.sqlite import ThreadConnections, open_connections

ACTIVE = "active"
REVOKED = "revoked"

_RECORD_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class DeviceRecord:
    """One enrolled device. ``algorithm`` is the only JWS ``alg`` its assertions may use."""

    device_id: str
    algorithm: str
    public_key_pem: str
    status: str
    # backend and hardware_backed are stored as the device claimed them at enrollment, and
    # nothing checks them. Only attested shows that a TPM holds the key.
    backend: str
    hardware_backed: bool
    enrolled_at: int
    revoked_at: int | None = None
    # True when a TPM attested at enrollment that it contains the private key.
    attested: bool = False

    @property
    def active(self) -> bool:
        return self.status == ACTIVE

    def to_json(self) -> dict[str, Any]:
        """Return the record as a JSON object, the form the enrollment response and CLI use."""
        return asdict(self)


def hash_enrollment_token(token: str) -> str:
    """Return the hex SHA-256 of an enrollment token, the form the registry stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class DeviceRegistry(Protocol):
    """Storage for device records and enrollment tokens; safe to call from several threads."""

    def get(self, device_id: str) -> DeviceRecord | None:
        """Return the record of a device, or None if it was never enrolled."""

    def get_unconfirmed(self, device_id: str) -> DeviceRecord | None:
        """Return an active record, maybe from a cache that missed a later revocation.

        Only for a caller that confirms later that the device is active, either in the atomic
        step that acts on it (see ``ChallengeStore.checks_device_status``) or by :meth:`get`
        after that step. A device id is the hash of its
        public key, so the key and algorithm of a cached record are always right. Fields other
        than ``status`` may lag. A record that is not active is read again, as by :meth:`get`.
        """

    def list_devices(self) -> list[DeviceRecord]:
        """Return every record, oldest enrollment first."""

    def set_status(self, device_id: str, status: str, now: int) -> DeviceRecord | None:
        """Set a device's status (``active`` or ``revoked``); None if the device is unknown."""

    def add_enrollment_token(
        self, token_hash: str, created_at: int, expires_at: int | None
    ) -> None:
        """Store a new enrollment token by its hash."""

    def enroll(self, token_hash: str, record: DeviceRecord, now: int) -> tuple[DeviceRecord, bool]:
        """Redeem an enrollment token for ``record`` in one transaction.

        Returns the stored record and whether it was created now. A token already redeemed by
        the same device returns the existing record with ``False``, so provisioning can be re-run.
        A valid unspent token for a key enrolled already also returns the existing record, and
        that token stays unspent.
        Raises :class:`VerificationError` with ``enrollment_token_invalid`` (unknown or expired),
        ``enrollment_token_used`` (redeemed by another device) or ``revoked_device``. A record
        with ``attested`` True marks an enrolled, unattested device as attested.
        """

    def check_enrollment_token(self, token_hash: str, device_id: str, now: int) -> None:
        """Raise the token errors :meth:`enroll` would raise for ``device_id``; spend nothing."""

    def device_certificate(self, device_id: str) -> str | None:
        """Return the PEM client certificate issued to a device, or None if none was issued."""

    def store_device_certificate(self, device_id: str, certificate_pem: str, now: int) -> str:
        """Store a device's certificate unless it has one already; return the stored one."""

    def put_pending_attestation(
        self, token_hash: str, data: str, expires_at: int, now: int
    ) -> None:
        """Store the attestation state of an enrollment token, replacing an earlier one.

        Also deletes every state that expired before ``now``.
        """

    def take_pending_attestation(self, token_hash: str) -> tuple[str, int] | None:
        """Delete and return an enrollment token's attestation state and its expiry, or None."""

    def close(self) -> None:
        """Release connections."""


_REGISTRY_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    algorithm TEXT NOT NULL,
    public_key_pem TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    backend TEXT NOT NULL,
    hardware_backed INTEGER NOT NULL,
    enrolled_at INTEGER NOT NULL,
    revoked_at INTEGER,
    attested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    token_hash TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    used_by TEXT,
    used_at INTEGER
);
CREATE TABLE IF NOT EXISTS device_certificates (
    device_id TEXT PRIMARY KEY,
    certificate_pem TEXT NOT NULL,
    issued_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_attestations (
    token_hash TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
"""

_SELECT_DEVICES = (
    "SELECT device_id, algorithm, public_key_pem, status, backend, hardware_backed, enrolled_at, "
    "revoked_at, attested FROM devices"
)
_INSERT_DEVICE = (
    "INSERT INTO devices (device_id, algorithm, public_key_pem, status, backend, hardware_backed, "
    "enrolled_at, revoked_at, attested) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _add_attested_column(connection: sqlite3.Connection) -> None:
    """Add ``devices.attested`` to a database created before attestation existed."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(devices)")}
    if "attested" in columns:
        return
    try:
        connection.execute("ALTER TABLE devices ADD COLUMN attested INTEGER NOT NULL DEFAULT 0")
    except sqlite3.OperationalError as exc:
        # Another process opening the same database may have added it first.
        if "duplicate column" not in str(exc):
            raise


def record_from_row(row: tuple[Any, ...]) -> DeviceRecord:
    """Build a record from the columns of ``_SELECT_DEVICES``, in SQLite or PostgreSQL."""
    return DeviceRecord(
        device_id=row[0],
        algorithm=row[1],
        public_key_pem=row[2],
        status=row[3],
        backend=row[4],
        hardware_backed=bool(row[5]),
        enrolled_at=int(row[6]),
        revoked_at=None if row[7] is None else int(row[7]),
        attested=bool(row[8]),
    )


def check_token(token: tuple[Any, Any] | None, device_id: str, now: int) -> None:
    """Raise the errors of an enrollment token row ``(expires_at, used_by)`` for ``device_id``.

    A token already redeemed by this device passes even after its expiry, so that
    provisioning can be re-run.
    """
    if token is None:
        raise VerificationError("enrollment_token_invalid", "no such enrollment token")
    expires_at, used_by = token
    if used_by is not None and used_by != device_id:
        raise VerificationError(
            "enrollment_token_used", "token was redeemed by another device", device_id=device_id
        )
    if used_by is None and expires_at is not None and now >= expires_at:
        raise VerificationError("enrollment_token_invalid", "enrollment token expired")


def record_to_keep(
    token: tuple[Any, Any] | None, existing: DeviceRecord | None, device_id: str, now: int
) -> DeviceRecord | None:
    """Apply the enrollment rules: return the enrolled record to keep, or None to create one.

    ``token`` is the token's row ``(expires_at, used_by)`` and ``existing`` the record of the
    key, if it is enrolled. Raises the errors that :meth:`DeviceRegistry.enroll` documents.
    """
    if token is None:
        raise VerificationError("enrollment_token_invalid", "no such enrollment token")
    expires_at, used_by = token
    # Checked before the re-run case below: a revoked key sending its own spent token again
    # would otherwise get its record back, and from a device CA a new client certificate.
    if existing is not None and not existing.active:
        raise VerificationError(
            "revoked_device", "a revoked device cannot enroll again", device_id=device_id
        )
    if used_by is not None:
        if used_by == device_id and existing is not None:
            return existing
        raise VerificationError(
            "enrollment_token_used", "token was redeemed by another device", device_id=device_id
        )
    if expires_at is not None and now >= expires_at:
        raise VerificationError("enrollment_token_invalid", "enrollment token expired")
    # An enrolled key needs no token: this one stays unspent for another device, and the
    # caller gets the existing record.
    return existing


class SQLiteDeviceRegistry:
    """Device records and enrollment tokens in SQLite (WAL), shareable by processes on one host.

    ``path`` is the database file, or the :class:`ThreadConnections` of a challenge store on the
    same file: sharing them is what lets :meth:`get` answer from its cache (see there). Closing
    either store then closes both.
    """

    def __init__(self, path: str | Path | ThreadConnections) -> None:
        self._connections = open_connections(path, _REGISTRY_SCHEMA)
        _add_attested_column(self._connections.get())
        # Records by device id, each with the cache generation in which its row was read.
        self._records: dict[str, tuple[int, DeviceRecord]] = {}
        self._generation = 0
        self._generation_lock = threading.Lock()

    @property
    def connections(self) -> ThreadConnections:
        """The per-thread connections, to pass to the other store on the same file."""
        return self._connections

    def _invalidate(self) -> int:
        with self._generation_lock:
            self._generation += 1
            return self._generation

    def get(self, device_id: str) -> DeviceRecord | None:
        # A cached record is served only if no connection but this thread's own has committed
        # anything to the database since the record's row was read. PRAGMA data_version on
        # this thread's connection changes after every commit by any other connection, in
        # this process or another, so a revocation committed before this call began bumps the
        # generation here and the row is read again. Writes through this registry bump the
        # generation themselves. A record is tagged with the generation read *before* its
        # SELECT, so a row read before another thread's bump can never be served after it.
        # NOTE: with several threads at once, each thread's nonce consumes are other connections'
        # commits for the rest, so this check then mostly misses (but stays correct). The login
        # path of Verifier.open avoids it through get_unconfirmed; access-token checks do not.
        generation = self._generation
        if self._connections.data_version_changed():
            generation = self._invalidate()
        cached = self._records.get(device_id)
        if cached is not None and cached[0] == generation:
            return cached[1]

        row = (
            self._connections.get()
            .execute(_SELECT_DEVICES + " WHERE device_id = ?", (device_id,))
            .fetchone()
        )
        if row is None:
            return None
        record = record_from_row(row)
        with self._generation_lock:
            if len(self._records) >= _RECORD_CACHE_SIZE:
                self._records.clear()
            self._records[device_id] = (generation, record)
        return record

    def get_unconfirmed(self, device_id: str) -> DeviceRecord | None:
        cached = self._records.get(device_id)
        if cached is not None and cached[1].status == ACTIVE:
            return cached[1]
        return self.get(device_id)

    def list_devices(self) -> list[DeviceRecord]:
        rows = (
            self._connections.get()
            .execute(_SELECT_DEVICES + " ORDER BY enrolled_at, device_id")
            .fetchall()
        )
        return [record_from_row(row) for row in rows]

    def set_status(self, device_id: str, status: str, now: int) -> DeviceRecord | None:
        if status not in (ACTIVE, REVOKED):
            raise ValueError(f"device status {status!r} is neither {ACTIVE!r} nor {REVOKED!r}")
        revoked_at = now if status == REVOKED else None
        self._connections.get().execute(
            # A second revocation keeps the time of the first.
            "UPDATE devices SET status = ?1, revoked_at = "
            "CASE WHEN status = 'revoked' AND ?1 = 'revoked' THEN revoked_at ELSE ?2 END "
            "WHERE device_id = ?3",
            (status, revoked_at, device_id),
        )
        self._invalidate()
        return self.get(device_id)

    def add_enrollment_token(
        self, token_hash: str, created_at: int, expires_at: int | None
    ) -> None:
        self._connections.get().execute(
            "INSERT INTO enrollment_tokens (token_hash, created_at, expires_at) VALUES (?, ?, ?)",
            (token_hash, created_at, expires_at),
        )

    def enroll(self, token_hash: str, record: DeviceRecord, now: int) -> tuple[DeviceRecord, bool]:
        connection = self._connections.get()
        # BEGIN IMMEDIATE takes the write lock first, so two enrollments cannot interleave.
        connection.execute("BEGIN IMMEDIATE")
        try:
            result = self._enroll_locked(connection, token_hash, record, now)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        self._invalidate()
        return result

    def _enroll_locked(
        self, connection: sqlite3.Connection, token_hash: str, record: DeviceRecord, now: int
    ) -> tuple[DeviceRecord, bool]:
        token = connection.execute(
            "SELECT expires_at, used_by FROM enrollment_tokens WHERE token_hash = ?",
            (token_hash,),
        ).fetchone()
        existing_row = connection.execute(
            _SELECT_DEVICES + " WHERE device_id = ?", (record.device_id,)
        ).fetchone()
        existing = None if existing_row is None else record_from_row(existing_row)
        enrolled = record_to_keep(token, existing, record.device_id, now)
        if enrolled is not None:
            return self._mark_attested(connection, enrolled, record), False

        connection.execute(
            "UPDATE enrollment_tokens SET used_by = ?, used_at = ? WHERE token_hash = ?",
            (record.device_id, now, token_hash),
        )
        connection.execute(
            _INSERT_DEVICE,
            (
                record.device_id,
                record.algorithm,
                record.public_key_pem,
                record.status,
                record.backend,
                int(record.hardware_backed),
                record.enrolled_at,
                record.revoked_at,
                int(record.attested),
            ),
        )
        return record, True

    def _mark_attested(
        self, connection: sqlite3.Connection, existing: DeviceRecord, record: DeviceRecord
    ) -> DeviceRecord:
        """Record a new attestation of an enrolled key; the other fields stay as enrolled."""
        if not record.attested or existing.attested:
            return existing
        connection.execute(
            "UPDATE devices SET attested = 1 WHERE device_id = ?", (existing.device_id,)
        )
        return replace(existing, attested=True)

    def check_enrollment_token(self, token_hash: str, device_id: str, now: int) -> None:
        token = (
            self._connections.get()
            .execute(
                "SELECT expires_at, used_by FROM enrollment_tokens WHERE token_hash = ?",
                (token_hash,),
            )
            .fetchone()
        )
        check_token(token, device_id, now)

    def device_certificate(self, device_id: str) -> str | None:
        row = (
            self._connections.get()
            .execute(
                "SELECT certificate_pem FROM device_certificates WHERE device_id = ?", (device_id,)
            )
            .fetchone()
        )
        return None if row is None else str(row[0])

    def store_device_certificate(self, device_id: str, certificate_pem: str, now: int) -> str:
        # Of two enrollments of one key racing here, the first certificate stays.
        self._connections.get().execute(
            "INSERT OR IGNORE INTO device_certificates (device_id, certificate_pem, issued_at) "
            "VALUES (?, ?, ?)",
            (device_id, certificate_pem, now),
        )
        stored = self.device_certificate(device_id)
        if stored is None:
            raise RuntimeError(f"the certificate of {device_id} was not stored")
        return stored

    def put_pending_attestation(
        self, token_hash: str, data: str, expires_at: int, now: int
    ) -> None:
        connection = self._connections.get()
        connection.execute("DELETE FROM pending_attestations WHERE expires_at < ?", (now,))
        connection.execute(
            "INSERT OR REPLACE INTO pending_attestations (token_hash, data, expires_at) "
            "VALUES (?, ?, ?)",
            (token_hash, data, expires_at),
        )

    def take_pending_attestation(self, token_hash: str) -> tuple[str, int] | None:
        # DELETE ... RETURNING (SQLite 3.35 and later) takes the state atomically, so two
        # enrollments cannot both use it.
        row = (
            self._connections.get()
            .execute(
                "DELETE FROM pending_attestations WHERE token_hash = ? RETURNING data, expires_at",
                (token_hash,),
            )
            .fetchone()
        )
        return None if row is None else (str(row[0]), int(row[1]))

    def close(self) -> None:
        self._connections.close()
