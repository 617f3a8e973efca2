"""PKCS#11 state of one process: loaded modules, token sessions, key lookup and the signer.

:mod:`device_sdk.keys.pkcs11` builds the public API on this module. The rules kept here, each for
a measured reason (python-pkcs11 0.10.1 on SoftHSM 2.6.1):

- One lock per loaded module around every PKCS#11 call. python-pkcs11 calls C_Initialize without
  CKF_OS_LOCKING_OK and releases the GIL around C calls, so SoftHSM turns its own locking off.
  Sessions used from several threads without the lock crashed the interpreter (SIGSEGV, 5 of 5
  runs).
- One logged-in session per token per process, and cached key handles. Login state belongs to the
  token and process, not the session. A key lookup before every sign cut the rate from about
  14,000 to 3,400 signs per second.
- ECDSA hashes on the host and signs with CKM_ECDSA: SoftHSM has no CKM_ECDSA_SHA256.
- After ``fork()`` the child initialises the module again and never touches the parent's handles.
- On CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT or an invalid session the token is found again by
  serial and label (never by a cached slot id), logged in again, and the operation retried once.
- A PIN that failed with CKR_PIN_INCORRECT is not sent again by this process, and the token's PIN
  flags are read before every login so that FINAL_TRY and LOCKED stop an unattended login.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11 as p11
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11e

from device_sdk.errors import (
    AmbiguousKeyError,
    KeyNotFoundError,
    KeyPolicyError,
    PinError,
    PinIncorrectError,
    PinLockedError,
    Pkcs11Error,
    SoftHSMError,
    TokenNotPresentError,
)
from device_sdk.keys import softhsm
from device_sdk.keys.base import PublicKey

__all__ = [
    "BACKEND_PKCS11",
    "BACKEND_SOFTHSM",
    "Pkcs11Signer",
    "decode_ec_point",
    "decode_ed25519_point",
    "reinitialize_module",
]

log = logging.getLogger(__name__)

BACKEND_PKCS11 = "pkcs11"
BACKEND_SOFTHSM = "softhsm"

# Return codes after which the token is looked up again and the operation retried once.
_RECOVERABLE: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.UserNotLoggedIn,
    p11e.KeyHandleInvalid,
    p11e.ObjectHandleInvalid,
)

_RECOVERABLE_OR_GONE: tuple[type[BaseException], ...] = (*_RECOVERABLE, TokenNotPresentError)

# CK_RV names and values (PKCS #11 v2.40, pkcs11t.h) of the python-pkcs11 exception classes, so
# that errors can show the code; python-pkcs11 exceptions carry neither.
_CKR: dict[type[p11e.PKCS11Error], tuple[str, int]] = {
    p11e.HostMemory: ("CKR_HOST_MEMORY", 0x2),
    p11e.GeneralError: ("CKR_GENERAL_ERROR", 0x5),
    p11e.FunctionFailed: ("CKR_FUNCTION_FAILED", 0x6),
    p11e.ArgumentsBad: ("CKR_ARGUMENTS_BAD", 0x7),
    p11e.AttributeReadOnly: ("CKR_ATTRIBUTE_READ_ONLY", 0x10),
    p11e.AttributeSensitive: ("CKR_ATTRIBUTE_SENSITIVE", 0x11),
    p11e.AttributeTypeInvalid: ("CKR_ATTRIBUTE_TYPE_INVALID", 0x12),
    p11e.AttributeValueInvalid: ("CKR_ATTRIBUTE_VALUE_INVALID", 0x13),
    p11e.DataInvalid: ("CKR_DATA_INVALID", 0x20),
    p11e.DataLenRange: ("CKR_DATA_LEN_RANGE", 0x21),
    p11e.DeviceError: ("CKR_DEVICE_ERROR", 0x30),
    p11e.DeviceMemory: ("CKR_DEVICE_MEMORY", 0x31),
    p11e.DeviceRemoved: ("CKR_DEVICE_REMOVED", 0x32),
    p11e.FunctionCancelled: ("CKR_FUNCTION_CANCELED", 0x50),
    p11e.FunctionNotSupported: ("CKR_FUNCTION_NOT_SUPPORTED", 0x54),
    p11e.KeyHandleInvalid: ("CKR_KEY_HANDLE_INVALID", 0x60),
    p11e.KeySizeRange: ("CKR_KEY_SIZE_RANGE", 0x62),
    p11e.KeyTypeInconsistent: ("CKR_KEY_TYPE_INCONSISTENT", 0x63),
    p11e.MechanismInvalid: ("CKR_MECHANISM_INVALID", 0x70),
    p11e.MechanismParamInvalid: ("CKR_MECHANISM_PARAM_INVALID", 0x71),
    p11e.ObjectHandleInvalid: ("CKR_OBJECT_HANDLE_INVALID", 0x82),
    p11e.OperationActive: ("CKR_OPERATION_ACTIVE", 0x90),
    p11e.OperationNotInitialized: ("CKR_OPERATION_NOT_INITIALIZED", 0x91),
    p11e.PinIncorrect: ("CKR_PIN_INCORRECT", 0xA0),
    p11e.PinInvalid: ("CKR_PIN_INVALID", 0xA1),
    p11e.PinLenRange: ("CKR_PIN_LEN_RANGE", 0xA2),
    p11e.PinExpired: ("CKR_PIN_EXPIRED", 0xA3),
    p11e.PinLocked: ("CKR_PIN_LOCKED", 0xA4),
    p11e.SessionClosed: ("CKR_SESSION_CLOSED", 0xB0),
    p11e.SessionCount: ("CKR_SESSION_COUNT", 0xB1),
    p11e.SessionHandleInvalid: ("CKR_SESSION_HANDLE_INVALID", 0xB3),
    p11e.SessionReadOnly: ("CKR_SESSION_READ_ONLY", 0xB5),
    p11e.SignatureInvalid: ("CKR_SIGNATURE_INVALID", 0xC0),
    p11e.SignatureLenRange: ("CKR_SIGNATURE_LEN_RANGE", 0xC1),
    p11e.TemplateIncomplete: ("CKR_TEMPLATE_INCOMPLETE", 0xD0),
    p11e.TemplateInconsistent: ("CKR_TEMPLATE_INCONSISTENT", 0xD1),
    p11e.TokenNotPresent: ("CKR_TOKEN_NOT_PRESENT", 0xE0),
    p11e.TokenNotRecognised: ("CKR_TOKEN_NOT_RECOGNIZED", 0xE1),
    p11e.TokenWriteProtected: ("CKR_TOKEN_WRITE_PROTECTED", 0xE2),
    p11e.UserAlreadyLoggedIn: ("CKR_USER_ALREADY_LOGGED_IN", 0x100),
    p11e.UserNotLoggedIn: ("CKR_USER_NOT_LOGGED_IN", 0x101),
    p11e.UserPinNotInitialized: ("CKR_USER_PIN_NOT_INITIALIZED", 0x102),
    p11e.AnotherUserAlreadyLoggedIn: ("CKR_USER_ANOTHER_ALREADY_LOGGED_IN", 0x104),
    p11e.UserTooManyTypes: ("CKR_USER_TOO_MANY_TYPES", 0x105),
    p11e.DomainParamsInvalid: ("CKR_DOMAIN_PARAMS_INVALID", 0x130),
    p11e.PinTooWeak: ("CKR_PIN_TOO_WEAK", 0x1B8),
    p11e.PublicKeyInvalid: ("CKR_PUBLIC_KEY_INVALID", 0x1B9),
    p11e.FunctionRejected: ("CKR_FUNCTION_REJECTED", 0x200),
}


def return_code(exc: BaseException) -> tuple[str | None, int | None]:
    """Return the CK_RV name and value that a python-pkcs11 exception stands for, if known."""
    name, code = _CKR.get(type(exc), (None, None))  # type: ignore[arg-type]
    return name, code


def pkcs11_error(
    operation: str,
    token: str | None,
    exc: BaseException,
    message: str = "",
    cls: type[Pkcs11Error] = Pkcs11Error,
) -> Pkcs11Error:
    """Build an SDK error for a failed PKCS#11 call, with the CK_RV name and value if known."""
    name, code = return_code(exc)
    if name is None:
        message = message or str(exc) or type(exc).__name__
    return cls(message, operation=operation, token=token, rv=code, rv_name=name)


# --- curves and public keys -------------------------------------------------------------------

# DER of CKA_EC_PARAMS (a namedCurve OID, or for Ed25519 also the PrintableString that
# PKCS #11 3.0 allows) mapped to the curve.
P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")
P384_PARAMS = bytes.fromhex("06052b81040022")
P521_PARAMS = bytes.fromhex("06052b81040023")
ED25519_PARAMS = bytes.fromhex("06032b6570")
ED25519_PRINTABLE = b"\x13\x0cedwards25519"
_EC_CURVES: dict[bytes, ec.EllipticCurve] = {
    P256_PARAMS: ec.SECP256R1(),
    P384_PARAMS: ec.SECP384R1(),
    P521_PARAMS: ec.SECP521R1(),
}


def _unwrap_octet_string(data: bytes) -> bytes | None:
    """Return the content of a DER OCTET STRING that spans all of ``data``, else None."""
    if len(data) < 2 or data[0] != 0x04:
        return None
    first = data[1]
    if first < 0x80:
        length, header = first, 2
    elif first == 0x81 and len(data) >= 3 and data[2] >= 0x80:
        length, header = data[2], 3
    elif first == 0x82 and len(data) >= 4 and data[2] != 0:
        length, header = int.from_bytes(data[2:4], "big"), 4
    else:
        return None
    if header + length != len(data):
        return None
    return data[header:]


def decode_ec_point(data: bytes, curve: ec.EllipticCurve) -> ec.EllipticCurvePublicKey:
    """Load CKA_EC_POINT given either as a DER OCTET STRING (the standard) or as the bare point.

    The point is uncompressed (``04 || X || Y``) or compressed (``02``/``03 || X``). A bare
    uncompressed point also begins with 0x04, so the DER form is accepted only when its length
    header covers exactly the rest of the value and the content is a point of this curve.
    """
    width = (curve.key_size + 7) // 8
    point_lengths = (1 + 2 * width, 1 + width)
    inner = _unwrap_octet_string(data)
    if inner is not None and len(inner) in point_lengths and len(data) not in point_lengths:
        data = inner
    if len(data) not in point_lengths:
        raise ValueError(
            f"CKA_EC_POINT of {len(data)} bytes is not a {curve.name} point, bare or in DER"
        )
    return ec.EllipticCurvePublicKey.from_encoded_point(curve, data)


def decode_ed25519_point(data: bytes) -> ed25519.Ed25519PublicKey:
    """Load an Ed25519 CKA_EC_POINT given as a DER OCTET STRING (``04 20 ...``) or 32 raw bytes."""
    if len(data) == 34:
        inner = _unwrap_octet_string(data)
        if inner is None:
            raise ValueError("Ed25519 CKA_EC_POINT of 34 bytes is not a DER OCTET STRING")
        data = inner
    if len(data) != 32:
        raise ValueError(f"Ed25519 CKA_EC_POINT has {len(data)} bytes; expected 32 or 34")
    return ed25519.Ed25519PublicKey.from_public_bytes(data)


def _public_key_from_attributes(
    key_type: int, ec_params: bytes | None, ec_point: bytes | None
) -> PublicKey:
    if ec_params is None or ec_point is None:
        raise ValueError("CKA_EC_PARAMS or CKA_EC_POINT missing")
    if key_type == KeyType.EC_EDWARDS:
        if ec_params not in (ED25519_PARAMS, ED25519_PRINTABLE):
            raise ValueError(f"unsupported Edwards curve parameters {ec_params.hex()}")
        return decode_ed25519_point(ec_point)
    curve = _EC_CURVES.get(ec_params)
    if curve is None:
        raise ValueError(f"unsupported EC curve parameters {ec_params.hex()}")
    return decode_ec_point(ec_point, curve)


# --- process-wide state: modules, tokens ------------------------------------------------------

@dataclass(frozen=True)
class TokenCriteria:
    """Token attributes of a URI; ``slot_id`` is used only for the first lookup."""

    label: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    slot_id: int | None = None

    def describe(self) -> str:
        parts = [
            f"{name}={value}"
            for name, value in (
                ("token", self.label),
                ("serial", self.serial),
                ("manufacturer", self.manufacturer),
                ("model", self.model),
                ("slot-id", self.slot_id),
            )
            if value is not None
        ]
        return ";".join(parts) or "any token"


class TokenSession:
    """The process's logged-in session on one token. ``valid`` turns False when it is dropped."""

    def __init__(self, token: Any, session: Any, logged_in: bool) -> None:
        self.token = token
        self.session = session
        self.logged_in = logged_in
        self.label: str = token.label
        self.serial: str = _serial_text(token.serial)
        self.valid = True


class LoadedModule:
    """A loaded PKCS#11 library, its lock and the tokens this process has open on it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.pid = os.getpid()
        self.is_softhsm = softhsm.is_softhsm(path)
        # SoftHSM reads this variable in C_Initialize only; see check_softhsm_config.
        self.softhsm_conf = os.environ.get("SOFTHSM2_CONF")
        try:
            self.lib = p11.lib(path)
        except p11e.PKCS11Error as exc:
            message = f"loading PKCS#11 module {path} failed"
            raise pkcs11_error("C_Initialize", None, exc, message) from exc
        self.tokens: dict[str, TokenSession] = {}

    def check_softhsm_config(self) -> None:
        """Raise SoftHSMError if SOFTHSM2_CONF changed since SoftHSM read it in C_Initialize.

        SoftHSM would go on using the old token directory, and keys from the new one would
        only be reported as not found.
        """
        current = os.environ.get("SOFTHSM2_CONF")
        if self.is_softhsm and current != self.softhsm_conf:
            raise SoftHSMError(
                f"SOFTHSM2_CONF is now {current}, but SoftHSM was initialised in this process "
                f"with {self.softhsm_conf} and reads the variable only then; use one token store "
                "per process, or call device_sdk.keys.pkcs11.reinitialize_module() after "
                "changing it"
            )

    def drop_tokens(self) -> None:
        """Forget every token session without calling the module (its handles may be stale)."""
        for token in self.tokens.values():
            token.valid = False
        self.tokens.clear()

    def reset_after_fork(self) -> None:
        """Initialise the module again in a forked child; parent handles are dropped unused."""
        log.info(
            "process %d was forked: initialising PKCS#11 module %s again", os.getpid(), self.path
        )
        self.drop_tokens()
        self._reinitialize()
        self.pid = os.getpid()

    def _reinitialize(self) -> None:
        # C_Finalize may fail in a child that inherited the parent's state, and C_Initialize
        # then reports CKR_CRYPTOKI_ALREADY_INITIALIZED; either way the module is usable again.
        with contextlib.suppress(p11e.PKCS11Error):
            self.lib.finalize()
        self.softhsm_conf = os.environ.get("SOFTHSM2_CONF")
        try:
            self.lib.initialize()
        except p11e.PKCS11Error as exc:
            if "already initialized" not in str(exc):
                raise pkcs11_error("C_Initialize", None, exc, f"module {self.path}") from exc


_MODULES: dict[str, LoadedModule] = {}
_REGISTRY_LOCK = threading.Lock()
# SHA-256 over (token serial, PIN) of PINs a token rejected in this process: never sent again.
_REJECTED_PINS: set[bytes] = set()


def _after_fork_in_child() -> None:
    # Another thread may have held a lock at fork time; the child would wait for it forever.
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    for module in _MODULES.values():
        module.lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def module_for(path: str) -> LoadedModule:
    with _REGISTRY_LOCK:
        module = _MODULES.get(path)
        if module is None:
            module = LoadedModule(path)
            _MODULES[path] = module
    return module


def is_loaded(path: str) -> bool:
    """Tell whether this process has loaded the PKCS#11 module at ``path``."""
    return path in _MODULES


def _check_process(module: LoadedModule) -> None:
    """Re-initialise ``module`` if this is a forked child; call with ``module.lock`` held."""
    if module.pid != os.getpid():
        module.reset_after_fork()


def reinitialize_module(path: str, *, only_if_loaded: bool = False) -> None:
    """Finalise and initialise a loaded module again, so it lists tokens created since.

    Every open key on the module finds its token and logs in again on its next use.
    """
    if only_if_loaded and path not in _MODULES:
        return
    module = module_for(path)
    with module.lock:
        _check_process(module)
        _close_tokens(module)
        module._reinitialize()
    log.info("PKCS#11 module %s initialised again", path)


def _close_tokens(module: LoadedModule) -> None:
    for state in module.tokens.values():
        with contextlib.suppress(p11e.PKCS11Error):
            state.session.close()
    module.drop_tokens()


def _serial_text(serial: bytes | str) -> str:
    if isinstance(serial, bytes):
        serial = serial.decode("ascii", "replace")
    return serial.strip(" \0")


def _find_token(module: LoadedModule, criteria: TokenCriteria) -> Any:
    """Return the one initialised token matching ``criteria``; call with ``module.lock`` held."""
    try:
        slots = module.lib.get_slots(token_present=True)
    except p11e.PKCS11Error as exc:
        raise pkcs11_error("C_GetSlotList", criteria.label, exc, f"module {module.path}") from exc

    matches = []
    seen = []
    for slot in slots:
        if criteria.slot_id is not None and slot.slot_id != criteria.slot_id:
            continue
        try:
            token = slot.get_token()
        except (p11e.TokenNotPresent, p11e.TokenNotRecognised, p11e.DeviceRemoved):
            continue
        if not token.flags & TokenFlag.TOKEN_INITIALIZED:
            continue
        seen.append(f"{token.label!r} (serial {_serial_text(token.serial)})")
        if criteria.label is not None and token.label != criteria.label:
            continue
        if criteria.serial is not None and _serial_text(token.serial) != criteria.serial:
            continue
        if criteria.manufacturer is not None and token.manufacturer_id != criteria.manufacturer:
            continue
        if criteria.model is not None and token.model != criteria.model:
            continue
        matches.append(token)

    if not matches:
        present = ", ".join(seen) or "none"
        fix = "Plug the token in or correct the URI"
        if module.is_softhsm and not module.softhsm_conf:
            # Without the variable SoftHSM reads its system-wide config, not the user's store.
            fix = (
                f"SOFTHSM2_CONF is not set, so SoftHSM read its default config "
                f"{softhsm.DEFAULT_CONF}: export SOFTHSM2_CONF=<store>/softhsm2.conf, the path "
                "that `device-sdk softhsm init` printed, or correct the URI"
            )
        raise TokenNotPresentError(
            f"no token matches {criteria.describe()} in module {module.path}; tokens present: "
            f"{present}. {fix}",
            operation="C_GetTokenInfo",
            token=criteria.label,
        )
    if len(matches) > 1:
        labels = ", ".join(f"{t.label!r} (serial {_serial_text(t.serial)})" for t in matches)
        raise Pkcs11Error(
            f"{len(matches)} tokens match {criteria.describe()}: {labels}; "
            "add token= or serial= to the URI",
            operation="C_GetTokenInfo",
            token=criteria.label,
        )
    return matches[0]


def _pin_fingerprint(serial: str, pin: str) -> bytes:
    return hashlib.sha256(f"{serial}\0{pin}".encode()).digest()


def check_pin_flags(token: Any) -> None:
    """Stop an unattended login that could lock the PIN; read fresh flags from the token."""
    try:
        flags = token.slot.get_token().flags
    except p11e.PKCS11Error as exc:
        raise pkcs11_error("C_GetTokenInfo", token.label, exc) from exc
    if flags & TokenFlag.USER_PIN_LOCKED:
        raise PinLockedError(
            "the user PIN is locked (CKF_USER_PIN_LOCKED); unlock it with the SO PIN",
            operation="C_Login",
            token=token.label,
        )
    if flags & TokenFlag.USER_PIN_FINAL_TRY:
        raise PinLockedError(
            "one more wrong PIN locks the token (CKF_USER_PIN_FINAL_TRY), so the SDK does not "
            "log in unattended; log in once by hand with the right PIN to reset the counter",
            operation="C_Login",
            token=token.label,
        )
    if flags & TokenFlag.USER_PIN_COUNT_LOW:
        log.warning(
            "token %r reports a wrong PIN entered before (CKF_USER_PIN_COUNT_LOW); check the PIN",
            token.label,
        )


def _login(module: LoadedModule, token: Any, pin: str | None) -> TokenSession:
    """Open the process's session on ``token`` and log in; call with ``module.lock`` held."""
    label = token.label
    if pin is None:
        try:
            session = token.open()
        except p11e.PKCS11Error as exc:
            raise pkcs11_error("C_OpenSession", label, exc) from exc
        log.info("opened a session on token %r without login (no PIN in the URI)", label)
        return TokenSession(token, session, logged_in=False)

    serial = _serial_text(token.serial)
    fingerprint = _pin_fingerprint(serial, pin)
    if fingerprint in _REJECTED_PINS:
        raise PinIncorrectError(
            "this PIN was rejected before in this process and is not tried again, to spare the "
            "token's retry counter; correct the pin-source",
            operation="C_Login",
            token=label,
        )
    check_pin_flags(token)

    try:
        session = token.open(user_pin=pin)
    except p11e.UserAlreadyLoggedIn:
        # Another session in this process logged in (login state is per token and process).
        # NOTE: python-pkcs11 opens the session before C_Login and drops it when C_Login fails,
        # so that session handle stays open until the module is finalised.
        log.debug("token %r: user already logged in; opening a session without login", label)
        try:
            session = token.open()
        except p11e.PKCS11Error as exc:
            raise pkcs11_error("C_OpenSession", label, exc) from exc
    except p11e.PinIncorrect as exc:
        _REJECTED_PINS.add(fingerprint)
        raise pkcs11_error(
            "C_Login", label, exc, "wrong PIN; not retried. Correct the pin-source",
            PinIncorrectError,
        ) from exc
    except p11e.PinLocked as exc:
        raise pkcs11_error(
            "C_Login", label, exc, "the user PIN is locked; unlock it with the SO PIN",
            PinLockedError,
        ) from exc
    except (p11e.PinExpired, p11e.PinInvalid, p11e.PinLenRange, p11e.UserPinNotInitialized) as exc:
        raise pkcs11_error("C_Login", label, exc, "login failed; check the PIN", PinError) from exc
    except _RECOVERABLE:
        raise
    except p11e.PKCS11Error as exc:
        raise pkcs11_error("C_Login", label, exc) from exc

    log.info("logged in to token %r (serial %s)", label, serial)
    return TokenSession(token, session, logged_in=True)


def token_for(
    module: LoadedModule, criteria: TokenCriteria, pin: Callable[[], str | None]
) -> TokenSession:
    """Return the process's session on the token, logging in on first use; lock held."""
    _check_process(module)
    token = _find_token(module, criteria)
    serial = _serial_text(token.serial)
    state = module.tokens.get(serial)
    if state is not None and state.valid:
        if not state.logged_in:
            secret = pin()
            if secret is not None:
                state = _replace_login(module, state, secret)
        return state
    state = _login(module, token, pin())
    module.tokens[serial] = state
    return state


def _replace_login(module: LoadedModule, state: TokenSession, pin: str) -> TokenSession:
    """Upgrade a public session on a token to a logged-in one."""
    fresh = _login(module, state.token, pin)
    state.valid = False
    with contextlib.suppress(p11e.PKCS11Error):
        state.session.close()
    module.tokens[fresh.serial] = fresh
    return fresh


# --- keys -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyCriteria:
    label: str | None
    key_id: bytes | None

    def describe(self) -> str:
        parts = []
        if self.label is not None:
            parts.append(f"object={self.label}")
        if self.key_id is not None:
            parts.append(f"id={self.key_id.hex()}")
        return ";".join(parts) or "any private key"

    def template(self, object_class: ObjectClass) -> dict[Attribute, Any]:
        template: dict[Attribute, Any] = {Attribute.CLASS: object_class}
        if self.label is not None:
            template[Attribute.LABEL] = self.label
        if self.key_id is not None:
            template[Attribute.ID] = self.key_id
        return template


def find_objects(state: TokenSession, template: dict[Attribute, Any], operation: str) -> list[Any]:
    try:
        return list(state.session.get_objects(template))
    except _RECOVERABLE:
        raise
    except p11e.PKCS11Error as exc:
        raise pkcs11_error(operation, state.label, exc) from exc


def describe_object(obj: Any) -> str:
    label = read_attribute(obj, Attribute.LABEL) or ""
    key_id = read_attribute(obj, Attribute.ID) or b""
    return f"id={key_id.hex() or '(empty)'} label={label!r}"


def read_attribute(obj: Any, attribute: Attribute) -> Any:
    try:
        return obj[attribute]
    except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive, p11e.FunctionFailed):
        return None


def _find_private_key(state: TokenSession, criteria: KeyCriteria) -> Any:
    matches = find_objects(state, criteria.template(ObjectClass.PRIVATE_KEY), "C_FindObjects")
    if not matches:
        hint = "" if state.logged_in else "; no PIN was given, so private objects are hidden"
        raise KeyNotFoundError(
            f"no private key matches {criteria.describe()} on token {state.label!r}{hint}"
        )
    if len(matches) > 1:
        listing = "; ".join(describe_object(obj) for obj in matches)
        raise AmbiguousKeyError(
            f"{len(matches)} private keys match {criteria.describe()} on token {state.label!r}: "
            f"{listing}. Add id= to the URI to pick one"
        )
    return matches[0]


def read_public_key(state: TokenSession, private: Any) -> PublicKey:
    """Read the public half: RSA from the private key, EC from the public key or certificate."""
    key_type = private[Attribute.KEY_TYPE]
    key_id = read_attribute(private, Attribute.ID) or None
    label = read_attribute(private, Attribute.LABEL) or None
    if key_type == KeyType.RSA:
        modulus = private[Attribute.MODULUS]
        exponent = private[Attribute.PUBLIC_EXPONENT]
        return rsa.RSAPublicNumbers(
            int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big")
        ).public_key()
    if key_type not in (KeyType.EC, KeyType.EC_EDWARDS):
        raise KeyNotFoundError(
            f"key {describe_object(private)} on token {state.label!r} has key type "
            f"0x{int(key_type):X}; only EC, Ed25519 and RSA keys are supported"
        )

    # Pair the public key by CKA_ID, which PKCS #11 uses to link the halves of a key pair.
    link = KeyCriteria(label=None if key_id else label, key_id=key_id)
    template = link.template(ObjectClass.PUBLIC_KEY)
    template[Attribute.KEY_TYPE] = key_type
    for public in find_objects(state, template, "C_FindObjects"):
        params = read_attribute(public, Attribute.EC_PARAMS)
        point = read_attribute(public, Attribute.EC_POINT)
        try:
            return _public_key_from_attributes(key_type, params, point)
        except ValueError as exc:
            raise KeyNotFoundError(
                f"public key {describe_object(public)} on token {state.label!r}: {exc}"
            ) from exc

    for cert in find_objects(state, link.template(ObjectClass.CERTIFICATE), "C_FindObjects"):
        public_key = x509.load_der_x509_certificate(cert[Attribute.VALUE]).public_key()
        if isinstance(public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
            return public_key
    raise KeyNotFoundError(
        f"private key {describe_object(private)} on token {state.label!r} has no public key "
        "or certificate object with the same CKA_ID, so its public key cannot be read"
    )


def check_key_policy(state: TokenSession, private: Any) -> None:
    sensitive = read_attribute(private, Attribute.SENSITIVE)
    extractable = read_attribute(private, Attribute.EXTRACTABLE)
    if extractable or sensitive is False:
        raise KeyPolicyError(
            f"private key {describe_object(private)} on token {state.label!r} can be exported "
            f"(CKA_EXTRACTABLE={extractable}, CKA_SENSITIVE={sensitive}); generate a new key "
            "with `device-sdk keys generate`"
        )


# --- signer -----------------------------------------------------------------------------------

# DigestInfo prefixes for RSASSA-PKCS1-v1_5 (RFC 8017, section 9.2, note 1).
_DIGEST_INFO = {
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_PSS_HASHES = {
    "sha224": (Mechanism.SHA224, p11.MGF.SHA224),
    "sha256": (Mechanism.SHA256, p11.MGF.SHA256),
    "sha384": (Mechanism.SHA384, p11.MGF.SHA384),
    "sha512": (Mechanism.SHA512, p11.MGF.SHA512),
}

_T = TypeVar("_T")


class Pkcs11Signer:
    """Signs with one private key on a PKCS#11 token, from any thread, after fork and re-plug.

    Every call holds the module's lock. The key handle is cached; when the token's session is
    dropped (fork, recovery, re-initialisation) the next call finds the token and key again.
    """

    def __init__(
        self,
        module: LoadedModule,
        token_criteria: TokenCriteria,
        key_criteria: KeyCriteria,
        pin: Callable[[], str | None],
    ) -> None:
        self._module = module
        self._token_criteria = token_criteria
        self._key_criteria = key_criteria
        self._pin = pin
        self._state: TokenSession | None = None
        self._handle: Any = None
        self._always_authenticate = False
        self.location = f"PKCS#11 token {token_criteria.label or token_criteria.describe()!r}"

    # Called with the module lock held.
    def _resolve(self) -> Any:
        module = self._module
        _check_process(module)
        state = self._state
        if state is None or not state.valid:
            state = token_for(module, self._token_criteria, self._pin)
            self._state = state
            self._handle = None
            self.location = f"PKCS#11 token {state.label!r}"
            # Later lookups use the serial and label found now, never a slot id.
            self._token_criteria = TokenCriteria(label=state.label, serial=state.serial)
        if self._handle is None:
            handle = _find_private_key(state, self._key_criteria)
            self._always_authenticate = bool(read_attribute(handle, Attribute.ALWAYS_AUTHENTICATE))
            self._handle = handle
        return self._handle

    def _recover(self, operation: str, exc: BaseException) -> None:
        state = self._state
        label = state.label if state else self._token_criteria.label
        log.warning(
            "%s on token %r failed with %s; finding the token again and retrying once",
            operation, label, return_code(exc)[0] or type(exc).__name__,
        )
        if state is not None:
            state.valid = False
            self._module.tokens.pop(state.serial, None)
            with contextlib.suppress(p11e.PKCS11Error):
                state.session.close()
        self._state = None
        self._handle = None

    def run(self, operation: str, call: Callable[[Any], _T]) -> _T:
        """Run ``call(private_key_handle)`` under the module lock, recovering the token once."""
        with self._module.lock:
            try:
                return call(self._resolve())
            except _RECOVERABLE as exc:
                return self._recover_and_retry(operation, call, exc)
            except p11e.PKCS11Error as exc:
                raise pkcs11_error(operation, self._label(), exc) from exc

    def _recover_and_retry(
        self, operation: str, call: Callable[[Any], _T], first: BaseException
    ) -> _T:
        """Find the token again, log in again and retry once; call with the module lock held."""
        self._recover(operation, first)
        try:
            return call(self._resolve())
        except _RECOVERABLE_OR_GONE as exc:
            self._state = None
            self._handle = None
            name, code = return_code(first)
            detail = "the token is still unavailable after finding it again and retrying once"
            if isinstance(exc, TokenNotPresentError):
                detail = f"the token was not found again ({exc})"
            raise TokenNotPresentError(
                f"{detail}; check that it is plugged in",
                operation=operation,
                token=self._label(),
                rv=code,
                rv_name=name,
            ) from exc
        except p11e.PKCS11Error as exc:
            raise pkcs11_error(operation, self._label(), exc) from exc

    def _label(self) -> str | None:
        return self._state.label if self._state else self._token_criteria.label

    def _sign(self, data: bytes, mechanism: Mechanism, param: Any) -> bytes:
        module = self._module
        with module.lock:
            # Hot path: the cached handle on a live session, in the process that opened it.
            handle = self._handle
            state = self._state
            if (
                handle is not None
                and state is not None
                and state.valid
                and module.pid == os.getpid()
                and not self._always_authenticate
            ):
                try:
                    return handle.sign(data, mechanism=mechanism, mechanism_param=param)  # type: ignore[no-any-return]
                except _RECOVERABLE as exc:
                    return self._recover_and_retry(
                        "C_Sign", lambda key: self._sign_call(key, data, mechanism, param), exc
                    )
                except p11e.PKCS11Error as exc:
                    raise pkcs11_error("C_Sign", state.label, exc) from exc
        return self.run("C_Sign", lambda key: self._sign_call(key, data, mechanism, param))

    def _sign_call(self, key: Any, data: bytes, mechanism: Mechanism, param: Any) -> bytes:
        if self._always_authenticate:
            # CKA_ALWAYS_AUTHENTICATE keys need the PIN again for each operation (a
            # context-specific C_Login), read again from the pin-source. A rejected PIN is
            # remembered as at login, so that it is not sent with every signature.
            pin = self._pin()
            state = self._state
            fingerprint = _pin_fingerprint(state.serial, pin) if state and pin else None
            if fingerprint is not None and fingerprint in _REJECTED_PINS:
                raise PinIncorrectError(
                    "this PIN was rejected before in this process and is not tried again, to "
                    "spare the token's retry counter; correct the pin-source",
                    operation="C_Login",
                    token=self._label(),
                )
            try:
                return key.sign(data, mechanism=mechanism, mechanism_param=param, pin=pin)  # type: ignore[no-any-return]
            except p11e.PinIncorrect as exc:
                if fingerprint is not None:
                    _REJECTED_PINS.add(fingerprint)
                raise pkcs11_error(
                    "C_Login", self._label(), exc, "wrong PIN; not retried. Correct the pin-source",
                    PinIncorrectError,
                ) from exc
        return key.sign(data, mechanism=mechanism, mechanism_param=param)  # type: ignore[no-any-return]

    def sign_ecdsa_digest(self, digest: bytes) -> bytes:
        return self._sign(digest, Mechanism.ECDSA, None)

    def sign_eddsa(self, data: bytes) -> bytes:
        return self._sign(data, Mechanism.EDDSA, None)

    def sign_rsa_digest(
        self,
        digest: bytes,
        algorithm: hashes.HashAlgorithm,
        pad: padding.AsymmetricPadding,
        salt_length: int | None,
    ) -> bytes:
        if salt_length is None:
            prefix = _DIGEST_INFO.get(algorithm.name)
            if prefix is None:
                raise ValueError(f"PKCS #1 v1.5 with {algorithm.name} is not supported")
            return self._sign(prefix + digest, Mechanism.RSA_PKCS, None)
        hash_params = _PSS_HASHES.get(algorithm.name)
        if hash_params is None:
            raise ValueError(f"RSA-PSS with {algorithm.name} is not supported")
        return self._sign(digest, Mechanism.RSA_PKCS_PSS, (*hash_params, salt_length))

    def attributes(self, *names: Attribute) -> dict[Attribute, Any]:
        """Read attributes of the private key object; unreadable ones come back as None."""
        return self.run(
            "C_GetAttributeValue", lambda key: {name: read_attribute(key, name) for name in names}
        )

    def token_label(self) -> str:
        with self._module.lock:
            self._resolve()
            assert self._state is not None
            return self._state.label

    def raw_handle(self) -> Any:
        """Return the python-pkcs11 private key object, for benchmarks and diagnostics only."""
        with self._module.lock:
            return self._resolve()


