"""The exception tree of device-sdk.

Every error the library raises on purpose derives from :class:`DeviceSDKError`. Messages say what
failed, on which value, and what to do next; they never contain a PIN, token or private key.

::

    DeviceSDKError
    ├── ConfigError                  invalid input: URI, config file, option, manifest row
    │   └── URIError                 a pkcs11:, tpm2: or serial: URI that does not parse
    ├── KeyStoreError                a key backend failed
    │   ├── Pkcs11Error              a PKCS#11 call failed: operation, token label, CKR_ code
    │   │   ├── TokenNotPresentError     token removed or not found, even after one retry
    │   │   ├── PinError                 login failed
    │   │   │   ├── PinIncorrectError        CKR_PIN_INCORRECT: never retried
    │   │   │   └── PinLockedError           CKR_PIN_LOCKED, or FINAL_TRY before an unattended login
    │   │   └── MechanismNotSupportedError   the token lacks a mechanism the operation needs
    │   ├── KeyNotFoundError         no key matches the URI
    │   ├── AmbiguousKeyError        more than one key matches the URI
    │   ├── KeyExistsError           a key with that label or id already exists
    │   ├── KeyExportError           export of a hardware key was requested
    │   ├── KeyPolicyError           a key is extractable or otherwise unsafe to use
    │   ├── SoftHSMError             SoftHSM library, config or token store problem
    │   ├── TPMError                 a TPM 2.0 command failed: command, TPM_RC_ code
    │   │   └── TPMLockoutError          TPM_RC_LOCKOUT: dictionary-attack lockout, never retried
    │   └── SerialLinkError          the serial secure element link failed
    │       ├── SerialTimeoutError       no complete reply before the deadline
    │       └── SerialDeviceError        the firmware answered with an error status
    ├── StoreError                   a verifier database failed or is unreachable
    ├── ProtocolError                a challenge, assertion or token is malformed or unusable
    │   └── VerificationError        the verifier rejected an assertion; ``reason`` says why
    ├── TransportError               an HTTP or MQTT exchange failed
    │   ├── LoginError               the server refused the login
    │   └── PasswordTooLongError     an MQTT password exceeds the MQTT or broker limit
    └── ProvisioningError            a provisioning step failed; ``step`` names it
        └── LockHeldError            another run holds the token or config lock: lock file, PID
"""

from __future__ import annotations

from pathlib import Path


class DeviceSDKError(Exception):
    """Base class of every error raised on purpose by device-sdk."""


class ConfigError(DeviceSDKError):
    """Invalid input from a user: a URI, config file, option or manifest row."""


class URIError(ConfigError):
    """A key URI that does not parse or names an unsupported attribute."""


class KeyStoreError(DeviceSDKError):
    """A key backend failed."""


class Pkcs11Error(KeyStoreError):
    """A PKCS#11 call failed.

    ``operation`` is the PKCS#11 function or SDK step (``C_Sign``), ``token`` the token label and
    ``rv`` the CK_RV return code when one is known.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str | None = None,
        token: str | None = None,
        rv: int | None = None,
        rv_name: str | None = None,
    ) -> None:
        self.operation = operation
        self.token = token
        self.rv = rv
        self.rv_name = rv_name
        parts = []
        if operation:
            parts.append(operation)
        if token is not None:
            parts.append(f"on token {token!r}")
        prefix = " ".join(parts)
        code = ""
        if rv is not None:
            code = f"{rv_name or 'CKR_?'} (0x{rv:X})"
        text = ": ".join(p for p in (prefix, code, message) if p)
        super().__init__(text)


class TokenNotPresentError(Pkcs11Error):
    """The token was removed or cannot be found, even after finding it again once."""


class PinError(Pkcs11Error):
    """Login to the token failed."""


class PinIncorrectError(PinError):
    """The PIN was wrong. The SDK never retries it, so the token's retry counter is spared."""


class PinLockedError(PinError):
    """The PIN is locked, or one more wrong try would lock it; an unattended login stops here."""


class MechanismNotSupportedError(Pkcs11Error):
    """The token lacks a mechanism that the operation needs."""


class KeyNotFoundError(KeyStoreError):
    """No key matches the URI."""


class AmbiguousKeyError(KeyStoreError):
    """More than one key matches the URI."""


class KeyExistsError(KeyStoreError):
    """A key with that label or id already exists on the token."""


class KeyExportError(KeyStoreError):
    """Export of a hardware-held private key was requested; the hardware never releases it."""


class KeyPolicyError(KeyStoreError):
    """A key fails the SDK's safety policy, for example it is extractable."""


class SoftHSMError(KeyStoreError):
    """The SoftHSM library, its config file or its token directory has a problem."""


class TPMError(KeyStoreError):
    """A TPM 2.0 command failed.

    ``command`` is the TPM command or SDK step (``TPM2_Sign``), ``rc`` the TSS2 return code and
    ``rc_name`` its name (``TPM_RC_LOCKOUT``) when one is known.
    """

    def __init__(
        self,
        message: str,
        *,
        command: str | None = None,
        rc: int | None = None,
        rc_name: str | None = None,
    ) -> None:
        self.command = command
        self.rc = rc
        self.rc_name = rc_name
        code = f"{rc_name or 'TPM_RC_?'} (0x{rc:X})" if rc is not None else ""
        super().__init__(": ".join(part for part in (command, code, message) if part))


class TPMLockoutError(TPMError):
    """The TPM is in dictionary-attack lockout and refuses authorizations for DA-protected keys.

    The SDK never retries, because every further failed try extends the lockout.
    ``recovery_interval`` is the seconds the TPM needs to forgive one failed try
    (TPM2_PT_LOCKOUT_INTERVAL) and ``failed_tries`` the current count, when the TPM reported them.
    """

    def __init__(
        self,
        message: str,
        *,
        command: str | None = None,
        rc: int | None = None,
        rc_name: str | None = None,
        recovery_interval: int | None = None,
        failed_tries: int | None = None,
    ) -> None:
        self.recovery_interval = recovery_interval
        self.failed_tries = failed_tries
        super().__init__(message, command=command, rc=rc, rc_name=rc_name)


class SerialLinkError(KeyStoreError):
    """The link to the serial secure element failed."""


class SerialTimeoutError(SerialLinkError):
    """No complete reply arrived before the deadline.

    ``bytes_received`` counts the bytes that did arrive, in frames that failed their checks too.
    """

    def __init__(self, message: str, *, bytes_received: int) -> None:
        self.bytes_received = bytes_received
        super().__init__(message)


class SerialDeviceError(SerialLinkError):
    """The firmware answered a command with an error status.

    ``status`` is the protocol status code and ``status_name`` its name (``SLOT_LOCKED``);
    ``detail`` is the secure element's own status byte, or 0.
    """

    def __init__(self, message: str, *, status: int, status_name: str, detail: int = 0) -> None:
        self.status = status
        self.status_name = status_name
        self.detail = detail
        super().__init__(message)


class StoreError(DeviceSDKError):
    """A verifier database failed or cannot be reached; the message names the server."""


class ProtocolError(DeviceSDKError):
    """A challenge, assertion or access token is malformed or cannot be used."""


class VerificationError(ProtocolError):
    """The verifier rejected an assertion.

    ``reason`` is a stable machine-readable code (``replayed``, ``expired``, ...) for logs and
    metrics; callers on the network only ever see a plain 401.
    """

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        device_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.device_id = device_id
        # Seconds until a rate-limited caller may try again (``reason == "rate_limited"``).
        self.retry_after = retry_after
        super().__init__(f"{reason}: {detail}" if detail else reason)


class TransportError(DeviceSDKError):
    """An HTTP or MQTT exchange failed."""


class LoginError(TransportError):
    """The server refused the login.

    ``status_code`` is the HTTP status of the answer when there was one, and ``retry_after`` the
    seconds the server asked the device to wait (HTTP 429 with ``Retry-After``).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status_code = status_code
        self.retry_after = retry_after
        super().__init__(message)


class PasswordTooLongError(TransportError):
    """An MQTT CONNECT password is longer than MQTT or the configured broker allows.

    ``length`` and ``limit`` are in bytes.
    """

    def __init__(self, message: str, *, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        super().__init__(message)


class ProvisioningError(DeviceSDKError):
    """A provisioning step failed; ``step`` names it."""

    def __init__(self, message: str, *, step: str | None = None) -> None:
        self.step = step
        super().__init__(f"{step}: {message}" if step else message)


class LockHeldError(ProvisioningError):
    """Another provisioning run holds the lock on a token or config.

    ``lock_path`` is the lock file and ``holder_pid`` the PID recorded in it, or None when the
    holder had not written it yet.
    """

    def __init__(self, message: str, *, lock_path: Path, holder_pid: int | None) -> None:
        self.lock_path = lock_path
        self.holder_pid = holder_pid
        super().__init__(message, step="lock")
