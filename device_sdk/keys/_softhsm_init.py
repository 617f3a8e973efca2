"""Initialise a SoftHSM token with C_InitToken and C_InitPIN, run in a child process.

``softhsm2-util --init-token`` takes its PINs only from ``--pin``/``--so-pin`` arguments (visible
in ``ps`` to every user) or from a terminal prompt, and python-pkcs11 0.10.1 has no C_InitToken.
So this module calls the PKCS#11 functions through ctypes. It runs in its own process because
SoftHSM reads SOFTHSM2_CONF only in C_Initialize, and the caller's process may already have the
library initialised on another token directory.

Usage: ``python -m device_sdk.keys._softhsm_init MODULE LABEL SO_PIN_FILE USER_PIN_FILE``.
The PINs are read from the files; the child prints one JSON object: ``{"serial": ..., "slot": ...}``
or ``{"error": ...}`` with exit status 1.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG
CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKF_TOKEN_INITIALIZED = 0x400
CKU_SO = 0

# Names of CK_FUNCTION_LIST members in order, up to the last one this module calls.
_FUNCTION_NAMES = (
    "C_Initialize C_Finalize C_GetInfo C_GetFunctionList C_GetSlotList C_GetSlotInfo "
    "C_GetTokenInfo C_GetMechanismList C_GetMechanismInfo C_InitToken C_InitPIN C_SetPIN "
    "C_OpenSession C_CloseSession C_CloseAllSessions C_GetSessionInfo C_GetOperationState "
    "C_SetOperationState C_Login C_Logout"
).split()


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _FunctionList(ctypes.Structure):
    _fields_ = [("version", _Version)] + [(name, ctypes.c_void_p) for name in _FUNCTION_NAMES]


class _TokenInfo(ctypes.Structure):
    _fields_ = [
        ("label", ctypes.c_char * 32),
        ("manufacturerID", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serialNumber", ctypes.c_char * 16),
        ("flags", CK_ULONG),
        *[(name, CK_ULONG) for name in (
            "ulMaxSessionCount", "ulSessionCount", "ulMaxRwSessionCount", "ulRwSessionCount",
            "ulMaxPinLen", "ulMinPinLen", "ulTotalPublicMemory", "ulFreePublicMemory",
            "ulTotalPrivateMemory", "ulFreePrivateMemory",
        )],
        ("hardwareVersion", _Version),
        ("firmwareVersion", _Version),
        ("utcTime", ctypes.c_char * 16),
    ]


_ULONG_P = ctypes.POINTER(CK_ULONG)
_ARGUMENT_TYPES: dict[str, tuple[type, ...]] = {
    "C_Initialize": (ctypes.c_void_p,),
    "C_Finalize": (ctypes.c_void_p,),
    "C_GetSlotList": (ctypes.c_ubyte, _ULONG_P, _ULONG_P),
    "C_GetTokenInfo": (CK_ULONG, ctypes.POINTER(_TokenInfo)),
    "C_InitToken": (CK_ULONG, ctypes.c_char_p, CK_ULONG, ctypes.c_char_p),
    "C_OpenSession": (CK_ULONG, CK_ULONG, ctypes.c_void_p, ctypes.c_void_p, _ULONG_P),
    "C_CloseSession": (CK_ULONG,),
    "C_Login": (CK_ULONG, CK_ULONG, ctypes.c_char_p, CK_ULONG),
    "C_Logout": (CK_ULONG,),
    "C_InitPIN": (CK_ULONG, ctypes.c_char_p, CK_ULONG),
}


class _InitError(Exception):
    pass


class _Module:
    def __init__(self, path: str) -> None:
        library = ctypes.CDLL(path)
        pointer = ctypes.POINTER(_FunctionList)()
        self._check("C_GetFunctionList", library.C_GetFunctionList(ctypes.byref(pointer)))
        self._functions = pointer.contents

    def call(self, name: str, *args: object) -> None:
        prototype = ctypes.CFUNCTYPE(CK_RV, *_ARGUMENT_TYPES[name])
        function = prototype(getattr(self._functions, name))
        self._check(name, function(*args))

    @staticmethod
    def _check(name: str, rv: int) -> None:
        if rv != 0:
            raise _InitError(f"{name} returned 0x{rv:X}")

    def token_info(self, slot: int) -> _TokenInfo:
        info = _TokenInfo()
        self.call("C_GetTokenInfo", slot, ctypes.byref(info))
        return info

    def slots(self) -> list[int]:
        count = CK_ULONG()
        self.call("C_GetSlotList", 1, None, ctypes.byref(count))
        slots = (CK_ULONG * count.value)()
        self.call("C_GetSlotList", 1, slots, ctypes.byref(count))
        return list(slots)[: count.value]


def _text(field: bytes) -> str:
    return field.decode("utf-8", "replace").rstrip(" \0")


def init_token(module_path: str, label: str, so_pin: bytes, user_pin: bytes) -> dict[str, object]:
    module = _Module(module_path)
    module.call("C_Initialize", None)
    try:
        free_slot = None
        for slot in module.slots():
            info = module.token_info(slot)
            if info.flags & CKF_TOKEN_INITIALIZED:
                if _text(info.label) == label:
                    raise _InitError(f"a token labelled {label!r} already exists in this store")
            elif free_slot is None:
                free_slot = slot
        if free_slot is None:
            raise _InitError("SoftHSM offers no free slot")

        padded_label = label.encode("utf-8").ljust(32, b" ")
        module.call("C_InitToken", free_slot, so_pin, len(so_pin), padded_label)

        session = CK_ULONG()
        flags = CKF_SERIAL_SESSION | CKF_RW_SESSION
        module.call("C_OpenSession", free_slot, flags, None, None, ctypes.byref(session))
        module.call("C_Login", session.value, CKU_SO, so_pin, len(so_pin))
        module.call("C_InitPIN", session.value, user_pin, len(user_pin))
        module.call("C_Logout", session.value)
        module.call("C_CloseSession", session.value)
        serial = _text(module.token_info(free_slot).serialNumber)
    finally:
        module.call("C_Finalize", None)
    return {"serial": serial}


def main(argv: list[str]) -> int:
    module_path, label, so_pin_file, user_pin_file = argv
    try:
        so_pin = Path(so_pin_file).read_bytes().strip()
        user_pin = Path(user_pin_file).read_bytes().strip()
        result = init_token(module_path, label, so_pin, user_pin)
    except (OSError, _InitError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
