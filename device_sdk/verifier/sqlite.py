"""SQLite connections shared by the embedded challenge store and device registry."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from device_sdk.errors import ConfigError

SQLITE_BUSY_TIMEOUT_MS = 5000
"""Milliseconds a statement waits for another process's write lock before failing."""

PAGE_SIZE = 1024
"""Bytes per page of a new database (see :func:`connect_sqlite`)."""

WAL_CHECKPOINT_BYTES = 4 * 1024 * 1024
"""WAL size after which a commit runs a checkpoint, as SQLite's default does with 4 KiB pages."""


def connect_sqlite(path: str | Path) -> sqlite3.Connection:
    """Open a SQLite database in autocommit mode with WAL, a busy timeout and NORMAL sync.

    WAL with ``synchronous=NORMAL`` survives a process crash; a power cut may lose the last
    transactions, which for challenges means at most a failed login.

    Every login writes one page to the WAL (its nonce consume), so a new database gets 1 KiB
    pages instead of 4 KiB: a quarter of the bytes to write and later checkpoint. A checkpoint
    then runs every 4096 pages, the same 4 MiB as SQLite's default. Together they take a
    consume from about 16 to 11 µs on a 2-core x86_64 machine (docs/benchmarks.md). An existing
    database keeps the page size it was created with.
    """
    connection = sqlite3.connect(
        str(path),
        timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,
        check_same_thread=False,
    )
    connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    # Takes effect only before the first table exists, and must come before the switch to WAL.
    connection.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal" and str(path) != ":memory:":
        raise ConfigError(f"SQLite database {path}: cannot switch to WAL mode (got {mode})")
    connection.execute("PRAGMA synchronous = NORMAL")
    # An existing database keeps its page size, so the checkpoint interval follows the real one.
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    connection.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_BYTES // page_size}")
    return connection


class ThreadConnections:
    """One SQLite connection per thread, because a connection must not be shared mid-statement.

    The challenge store and the device registry on one file can share one instance (pass it in
    place of the path). Then a thread runs both on one connection, and ``PRAGMA data_version``
    on it changes only when another connection, in this process or another one, commits.
    """

    def __init__(self, path: str | Path, schema: str) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        with self._lock:
            try:
                first = connect_sqlite(path)
                first.executescript(schema)
            except sqlite3.OperationalError:
                raise
            except sqlite3.DatabaseError as exc:
                # "file is not a database": the path names some other file.
                raise ConfigError(
                    f"{path} is not a SQLite database ({exc}); pass the path of a verifier "
                    "database, or a new file name to create one"
                ) from None
            self._local.connection = first
            self._all.append(first)

    def add_schema(self, schema: str) -> None:
        """Create the tables of another store in this database, if they are missing."""
        self.get().executescript(schema)

    def get(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = connect_sqlite(self.path)
            self._local.connection = connection
            with self._lock:
                self._all.append(connection)
        return connection

    def data_version_changed(self) -> bool:
        """Tell whether another connection committed since this thread last asked.

        The first call on a thread returns True, because nothing is known about the past.
        """
        connection = self.get()
        version = connection.execute("PRAGMA data_version").fetchone()[0]
        if getattr(self._local, "data_version", None) == version:
            return False
        self._local.data_version = version
        return True

    def close(self) -> None:
        with self._lock:
            for connection in self._all:
                connection.close()
            self._all.clear()
        self._local = threading.local()


def open_connections(
    path_or_connections: str | Path | ThreadConnections, schema: str
) -> ThreadConnections:
    """Open connections on a path, or add ``schema`` to connections that another store opened."""
    if isinstance(path_or_connections, ThreadConnections):
        path_or_connections.add_schema(schema)
        return path_or_connections
    return ThreadConnections(path_or_connections, schema)
