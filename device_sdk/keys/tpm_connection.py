"""One ESAPI context per TCTI and process, TPM return codes mapped to SDK errors, and retries.

A TPM runs one command at a time. Without a resource manager (swtpm on a socket, or
``/dev/tpm0``) the caller also owns the TPM's few object slots (three on swtpm 0.7), so every
command sequence runs under the connection's lock and flushes the transient objects it loaded.

TPM_RC_RETRY, TPM_RC_YIELDED and TPM_RC_TESTING are retried with exponential backoff.
TPM_RC_LOCKOUT is never retried: each further failed authorization extends the lockout.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from device_sdk.errors import KeyNotFoundError, TPMError, TPMLockoutError

INSTALL_HINT = (
    "the TPM backend needs tpm2-pytss, which builds against the TSS 2.0 libraries: "
    "apt install libtss2-dev, then pip install 'device-sdk[tpm]'"
)

# The TSS libraries print their own error lines to stderr, also for conditions this module
# expects and raises as TPMError (an empty persistent handle). Setting TSS2_LOG yourself, for
# example to all+debug, brings them back. The TSS reads it at its first log call.
os.environ.setdefault("TSS2_LOG", "all+NONE")

try:
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_CAP, TPM2_PT, TSS2_Exception
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ModuleNotFoundError(INSTALL_HINT, name="tpm2_pytss") from exc

__all__ = [
    "DEFAULT_TCTI",
    "INSTALL_HINT",
    "TCTI_ENVIRONMENT",
    "TpmConnection",
    "close_connections",
    "connection_for",
    "is_link_failure",
    "resolve_tcti",
    "rc_name",
]

log = logging.getLogger(__name__)

DEFAULT_TCTI = "device:/dev/tpmrm0"

# Environment variables naming a TCTI, first match wins: tpm2-tools' variable, the TSS one, and
# the short form that tpm2-tools also reads.
TCTI_ENVIRONMENT = ("TPM2TOOLS_TCTI", "TSS2_TCTI", "TCTI")

# Response codes (TPM 2.0 Part 2, 6.6.3), kept in one table so messages show their names.
RC_NAMES = {
    0x08B: "TPM_RC_HANDLE",
    0x08E: "TPM_RC_AUTH_FAIL",
    0x09D: "TPM_RC_SIGNATURE",
    0x0A2: "TPM_RC_BAD_AUTH",
    0x101: "TPM_RC_FAILURE",
    0x128: "TPM_RC_NV_RANGE",
    0x14C: "TPM_RC_NV_DEFINED",
    0x902: "TPM_RC_OBJECT_MEMORY",
    0x903: "TPM_RC_SESSION_MEMORY",
    0x908: "TPM_RC_YIELDED",
    0x90A: "TPM_RC_TESTING",
    0x920: "TPM_RC_NV_RATE",
    0x921: "TPM_RC_LOCKOUT",
    0x922: "TPM_RC_RETRY",
    0x923: "TPM_RC_NV_UNAVAILABLE",
}
RC_HANDLE = 0x08B
RC_LOCKOUT = 0x921
RC_OBJECT_MEMORY = 0x902
RETRIED_CODES = frozenset({0x908, 0x90A, 0x922})

# TSS2 layers (tss2_common.h): 0 is the TPM itself, 10 the TCTI (the link to the TPM).
_LAYER_MASK = 0xFF0000
_TCTI_LAYER = 10 << 16

RETRY_ATTEMPTS = 6
RETRY_FIRST_DELAY = 0.01  # seconds, doubled after each retry: at most 0.63 s waited in all

T = TypeVar("T")


def is_link_failure(error: TPMError) -> bool:
    """Return True when ``error`` came from the TCTI: the link to the TPM broke, not a command."""
    return error.rc is not None and error.rc & _LAYER_MASK == _TCTI_LAYER


def rc_name(error: TSS2_Exception) -> str:
    """Return the TPM_RC_ name of a TPM error, or the TSS's own decoding for other layers."""
    if error.rc & _LAYER_MASK == 0 and error.error in RC_NAMES:
        return RC_NAMES[error.error]
    return str(error)


def resolve_tcti(tcti: str | None) -> str:
    """Return the TCTI to use: the URI's, else the environment's, else ``DEFAULT_TCTI``."""
    if tcti:
        return tcti
    for name in TCTI_ENVIRONMENT:
        value = os.environ.get(name)
        if value:
            return value
    return DEFAULT_TCTI


class TpmConnection:
    """An ESAPI context on one TCTI, opened on first use and reopened after a link failure.

    Hold :attr:`lock` around every sequence of commands that must not interleave with another
    thread's (load, sign, flush).
    """

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self.lock = threading.RLock()
        self._context: ESAPI | None = None
        self._persistent: dict[int, Any] = {}

    @property
    def context(self) -> ESAPI:
        """The open ESAPI context; opens it on first use."""
        if self._context is None:
            try:
                self._context = ESAPI(self.tcti)
            except TSS2_Exception as exc:
                raise TPMError(
                    f"cannot open the TPM through TCTI {self.tcti!r}; check that the TPM device "
                    "or simulator is there, or set the TCTI with ?tcti= in the key URI or with "
                    f"${TCTI_ENVIRONMENT[0]}",
                    command="Esys_Initialize",
                    rc=exc.rc,
                    rc_name=rc_name(exc),
                ) from exc
            log.info("opened the TPM through TCTI %s", self.tcti)
        return self._context

    def close(self) -> None:
        """Close the ESAPI context; the next command opens a new one."""
        with self.lock:
            if self._context is not None:
                self._context.close()
                self._context = None
                self._persistent.clear()
                log.info("closed the TPM connection on TCTI %s", self.tcti)

    def call(self, command: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one ESAPI function, retrying TPM_RC_RETRY, YIELDED and TESTING with backoff.

        Raises TPMLockoutError on TPM_RC_LOCKOUT without retrying, and TPMError otherwise.
        """
        delay = RETRY_FIRST_DELAY
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                return function(*args, **kwargs)
            except TSS2_Exception as exc:
                code = exc.error if exc.rc & _LAYER_MASK == 0 else None
                if code in RETRIED_CODES and attempt < RETRY_ATTEMPTS:
                    log.info(
                        "%s: %s on attempt %d, retrying in %.3f s",
                        command,
                        rc_name(exc),
                        attempt,
                        delay,
                    )
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise self._error_for(command, exc) from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _error_for(self, command: str, exc: TSS2_Exception) -> TPMError:
        if exc.rc & _LAYER_MASK == _TCTI_LAYER:
            # The link broke (simulator restarted, device gone): start afresh on the next call.
            self.close()
            return TPMError(
                f"the link to the TPM through TCTI {self.tcti!r} failed; the next call reconnects",
                command=command,
                rc=exc.rc,
                rc_name=rc_name(exc),
            )
        if exc.rc & _LAYER_MASK == 0 and exc.error == RC_LOCKOUT:
            return self._lockout_error(command, exc)
        message = str(exc)
        if exc.rc & _LAYER_MASK == 0 and exc.error == RC_OBJECT_MEMORY:
            message += (
                "; the TPM's object slots are full, probably with transient objects that another "
                "program left loaded: list them with tpm2_getcap handles-transient and flush "
                "them with tpm2_flushcontext -t, or use a resource manager (/dev/tpmrm0)"
            )
        return TPMError(message, command=command, rc=exc.rc, rc_name=rc_name(exc))

    def _lockout_error(self, command: str, exc: TSS2_Exception) -> TPMLockoutError:
        # Reading properties needs no authorization, so it cannot extend the lockout.
        properties = self.properties(
            TPM2_PT.LOCKOUT_COUNTER, TPM2_PT.MAX_AUTH_FAIL, TPM2_PT.LOCKOUT_INTERVAL
        )
        interval = properties.get(int(TPM2_PT.LOCKOUT_INTERVAL))
        failed = properties.get(int(TPM2_PT.LOCKOUT_COUNTER))
        maximum = properties.get(int(TPM2_PT.MAX_AUTH_FAIL))
        if interval is not None:
            recovery = f"it forgives one failed try every {interval} s"
        else:
            recovery = "its recovery interval could not be read"
        if failed is not None and maximum is not None:
            recovery += f" ({failed} failed tries counted, the limit is {maximum})"
        return TPMLockoutError(
            f"the TPM is in dictionary-attack lockout after failed authorizations, so it refuses "
            f"keys without noDA; {recovery}. Wait, or reset the counter with the lockout "
            "authorization (tpm2_dictionarylockout --clear-lockout). The SDK does not retry",
            command=command,
            rc=exc.rc,
            rc_name="TPM_RC_LOCKOUT",
            recovery_interval=interval,
            failed_tries=failed,
        )

    def properties(self, *wanted: int) -> dict[int, int]:
        """Read fixed or variable TPM properties (TPM2_PT_*); returns those the TPM reported."""
        found: dict[int, int] = {}
        try:
            for prop in wanted:
                _, data = self.context.get_capability(TPM2_CAP.TPM_PROPERTIES, int(prop), 1)
                for entry in data.data.tpmProperties:
                    if int(entry.property) == int(prop):
                        found[int(prop)] = int(entry.value)
        except (TSS2_Exception, TPMError) as exc:
            log.warning("could not read TPM properties on TCTI %s: %s", self.tcti, exc)
        return found

    def persistent(self, handle: int, location: str) -> Any:
        """Return the ESYS_TR of a persistent object, raising KeyNotFoundError when it is absent.

        The ESYS_TR is cached per connection: it names the object without taking a TPM slot.
        """
        cached = self._persistent.get(handle)
        if cached is not None:
            return cached
        try:
            tr = self.context.tr_from_tpmpublic(handle)
        except TSS2_Exception as exc:
            if exc.rc & _LAYER_MASK == 0 and exc.error == RC_HANDLE:
                raise KeyNotFoundError(
                    f"{location} not found: persistent handle 0x{handle:08x} is empty; create "
                    "the key with device-sdk provision or tpm2_evictcontrol"
                ) from exc
            raise self._error_for("TPM2_ReadPublic", exc) from exc
        self._persistent[handle] = tr
        return tr

    def forget_persistent(self, handle: int, *, closed: bool = False) -> None:
        """Drop the cached ESYS_TR of a persistent handle; ``closed`` when ESAPI already closed it.

        TPM2_EvictControl on a persistent object closes its ESYS_TR.
        """
        tr = self._persistent.pop(handle, None)
        if tr is not None and not closed and self._context is not None:
            try:
                self._context.tr_close(tr)
            except TSS2_Exception as exc:
                log.debug("tr_close of handle 0x%08x failed: %s", handle, exc)

    @contextmanager
    def transient(self, command: str, handle: Any) -> Iterator[Any]:
        """Yield a transient object's ESYS_TR and flush it afterwards, even on errors."""
        try:
            yield handle
        finally:
            self.flush(command, handle)

    def flush(self, command: str, handle: Any) -> None:
        """Flush a transient object; a failure is only logged, so the caller's own error wins."""
        if handle is None or handle == ESYS_TR.NONE or self._context is None:
            return
        try:
            self._context.flush_context(handle)
        except TSS2_Exception as exc:
            log.warning("TPM2_FlushContext after %s failed: %s", command, rc_name(exc))


_connections: dict[str, TpmConnection] = {}
_connections_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # The child must not write to the parent's TPM link, and a lock held by another thread at
    # fork time would never be released. The ESAPI contexts are dropped without Esys_Finalize,
    # which would close the parent's socket or device file too.
    global _connections_lock
    _connections_lock = threading.Lock()
    for connection in _connections.values():
        connection.lock = threading.RLock()
        connection._context = None
        connection._persistent.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def connection_for(tcti: str) -> TpmConnection:
    """Return this process's connection for ``tcti``, creating it on first use."""
    with _connections_lock:
        connection = _connections.get(tcti)
        if connection is None:
            connection = TpmConnection(tcti)
            _connections[tcti] = connection
        return connection


def close_connections() -> None:
    """Close every TPM connection of this process; each reopens on its next use.

    Call it before the TPM goes away (a simulator stops) or before a fork.
    """
    with _connections_lock:
        connections = list(_connections.values())
    for connection in connections:
        connection.close()
