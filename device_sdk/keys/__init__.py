"""Hardware keys behind one interface, opened by URI.

``open_key(uri)`` dispatches on the URI scheme: ``pkcs11:`` (RFC 7512), ``tpm2:`` and ``serial:``.
"""

from __future__ import annotations

from typing import Any

from device_sdk.errors import URIError
from device_sdk.keys.base import HardwareKey, compute_device_id

__all__ = ["HardwareKey", "compute_device_id", "open_key"]


def open_key(uri: str, **options: Any) -> HardwareKey:
    """Open the key named by ``uri`` with the backend its scheme selects."""
    scheme = uri.partition(":")[0].lower()
    if scheme == "pkcs11":
        from device_sdk.keys import pkcs11

        return pkcs11.open_key(uri, **options)  # type: ignore[no-any-return]
    if scheme == "tpm2":
        from device_sdk.keys import tpm

        return tpm.open_key(uri, **options)  # type: ignore[no-any-return]
    if scheme == "serial":
        import device_sdk.keys.serial as serial

        return serial.open_key(uri, **options)  # type: ignore[no-any-return]
    raise URIError(
        f"unsupported key URI scheme {scheme!r} in {uri.split('?')[0]!r}; "
        "use pkcs11:, tpm2: or serial:"
    )
