"""Exclusive locks so two provisioning runs never work on the same token or config at once.

A lock is an ``fcntl.flock`` on a small file that also contains the holder's PID, so the run that
loses can name the lock file and the process that holds it. The kernel drops the lock when the
holder exits, even by SIGKILL or a power cut, so a stale lock file never blocks a later run.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from device_sdk.errors import LockHeldError, ProvisioningError

logger = logging.getLogger(__name__)

LOCK_DIR_ENV = "DEVICE_SDK_LOCK_DIR"


def default_lock_dir() -> Path:
    """Return the directory for token lock files.

    ``DEVICE_SDK_LOCK_DIR`` wins; otherwise ``/run/lock/device-sdk`` where it can be created,
    else a ``device-sdk-locks`` directory in the system temporary directory.
    """
    configured = os.environ.get(LOCK_DIR_ENV)
    if configured:
        return Path(configured)
    for candidate in (
        Path("/run/lock/device-sdk"),
        Path(tempfile.gettempdir(), "device-sdk-locks"),
    ):
        try:
            candidate.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    raise ProvisioningError(
        f"no writable directory for lock files; set {LOCK_DIR_ENV} to one", step="lock"
    )


def lock_path_for(name: str, lock_dir: Path | None = None) -> Path:
    """Return the lock file path for a resource name such as ``pkcs11-token-edge-01``.

    The file name keeps a readable part of the name and adds a hash, so names that differ only in
    characters unsafe for a file name still get different files.
    """
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60]
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]
    return (lock_dir or default_lock_dir()) / f"{readable}-{digest}.lock"


def _read_holder_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


# The holder writes its PID just after taking the lock and clears it just before releasing it,
# so a reader that finds no PID polls briefly: either the PID appears or the lock comes free.
HOLDER_POLL_SECONDS = 0.5
HOLDER_POLL_INTERVAL = 0.01
_LOCKED = -1


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return False
    return True


def _lock_or_find_holder(fd: int) -> int | None:
    """Take the lock and return ``_LOCKED``, or return the holder's PID (None if unknown)."""
    deadline = time.monotonic() + HOLDER_POLL_SECONDS
    while True:
        if _try_lock(fd):
            return _LOCKED
        holder = _read_holder_pid(fd)
        if holder is not None or time.monotonic() >= deadline:
            return holder
        time.sleep(HOLDER_POLL_INTERVAL)


@contextmanager
def exclusive_lock(lock_path: Path, *, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``lock_path`` for the ``with`` block, or raise LockHeldError.

    ``what`` names the locked resource in the error, for example ``token 'edge-01'``. The call
    does not wait: a second run gets the error at once.
    """
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ProvisioningError(
            f"cannot open lock file {lock_path}: {exc.strerror}; set {LOCK_DIR_ENV} to a "
            "directory this user can write",
            step="lock",
        ) from None
    try:
        holder = _lock_or_find_holder(fd)
        if holder is not _LOCKED:
            holder_text = f"PID {holder}" if holder is not None else "an unknown process"
            raise LockHeldError(
                f"{what} is being provisioned by another run ({holder_text}, lock file "
                f"{lock_path}); wait for that run to finish and start again",
                lock_path=lock_path,
                holder_pid=holder,
            )

        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        logger.debug("locked %s (%s)", what, lock_path)
        try:
            yield lock_path
        finally:
            # Clear the PID before unlocking so a later reader never blames a finished run.
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            logger.debug("unlocked %s (%s)", what, lock_path)
    finally:
        os.close(fd)
