"""The key backend operations that provisioning uses, for every URI scheme in one place.

PKCS#11 is complete here. ``tpm2:`` and ``serial:`` keys are opened through
:func:`device_sdk.keys.open_key`, and created through their backend module's ``generate_key``
where that module has one.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_sdk.errors import (
    ConfigError,
    KeyNotFoundError,
    KeyPolicyError,
    ProvisioningError,
)
from device_sdk.keys import open_key
from device_sdk.keys.signing import AnyHardwareKey
from device_sdk.keys.uri import Pkcs11URI, SerialURI, Tpm2URI, parse_key_uri, resolve_module

logger = logging.getLogger(__name__)

DeviceKey = AnyHardwareKey


@dataclass(frozen=True)
class KeyReference:
    """A key URI as provisioning uses it: parsed, checked to hold no PIN, and named for locks."""

    text: str
    parsed: Pkcs11URI | Tpm2URI | SerialURI

    @classmethod
    def parse(cls, text: str) -> KeyReference:
        parsed = parse_key_uri(text)
        if isinstance(parsed, Pkcs11URI):
            if parsed.pin_value is not None:
                raise ConfigError(
                    "the key URI contains a pin-value, which would put the PIN on a command line "
                    "and in the config; write the PIN to a file of mode 0600 and use "
                    "pin-source=file:/path/to/pin"
                )
            if not parsed.object and not parsed.id:
                raise ConfigError(
                    f"{parsed} names no key: add object=LABEL (and optionally id=) so "
                    "provisioning can find the key again after a crash"
                )
        return cls(text=text, parsed=parsed)

    @property
    def scheme(self) -> str:
        return self.text.partition(":")[0].lower()

    @property
    def public_uri(self) -> str:
        """The URI with any secret redacted: safe for logs, state files and reports."""
        return str(self.parsed)

    @property
    def pin_source(self) -> str | None:
        return self.parsed.pin_source if isinstance(self.parsed, Pkcs11URI) else None

    @property
    def lock_name(self) -> str:
        """A name for the token this key lives on, the same for every key on that token."""
        parsed = self.parsed
        if isinstance(parsed, Pkcs11URI):
            module = resolve_module(parsed) or os.environ.get("DEVICE_SDK_PKCS11_MODULE", "")
            store = os.environ.get("SOFTHSM2_CONF", "")
            token = parsed.serial or parsed.token or f"slot-{parsed.slot_id}"
            return f"pkcs11-token-{token}-{module}-{store}"
        return f"{self.scheme}-{self.public_uri.partition('?')[0]}"

    def describe(self) -> str:
        parsed = self.parsed
        if isinstance(parsed, Pkcs11URI):
            return f"token {parsed.token or parsed.serial or parsed.slot_id!r}"
        return f"key store {self.public_uri.partition('?')[0]}"


def _backend_module(ref: KeyReference) -> Any:
    name = {"pkcs11": "pkcs11", "tpm2": "tpm", "serial": "serial"}[ref.scheme]
    try:
        return importlib.import_module(f"device_sdk.keys.{name}")
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"the {ref.scheme}: key backend is not available here ({exc.name} is missing)"
        ) from exc


def find_key(ref: KeyReference) -> DeviceKey | None:
    """Open the key, or return None when the token has no key matching the URI."""
    try:
        key = open_key(ref.text)
    except KeyNotFoundError:
        return None
    return key  # type: ignore[return-value]


def generate_key(ref: KeyReference, algorithm: str) -> DeviceKey:
    """Create the key on its token. Call only after :func:`find_key` returned None."""
    module = _backend_module(ref)
    generate = getattr(module, "generate_key", None)
    if generate is None:
        raise ProvisioningError(
            f"the {ref.scheme}: backend cannot create keys; create the key with the backend's "
            "own tools and run provisioning again",
            step="key",
        )
    key: DeviceKey = generate(ref.text, algorithm)
    return key


def _module_is_softhsm(ref: KeyReference) -> bool:
    if not isinstance(ref.parsed, Pkcs11URI):
        return False
    from device_sdk.keys import softhsm

    path = resolve_module(ref.parsed) or os.environ.get("DEVICE_SDK_PKCS11_MODULE")
    if path is None:
        # The PKCS#11 backend falls back to SoftHSM when the URI names no module.
        return True
    return softhsm.is_softhsm(path)


def check_software_key_allowed(
    ref: KeyReference, allowed: bool, key: DeviceKey | None = None
) -> None:
    """Raise KeyPolicyError for a software key (SoftHSM) unless software keys are allowed.

    Without ``key`` the decision comes from the PKCS#11 module path, so no software key is made
    before the check.
    """
    if allowed:
        return
    if key is None:
        software = _module_is_softhsm(ref)
        store = "a software key store (SoftHSM): its private key is a file on this host"
    else:
        software = not key.hardware_backed
        store = f"a software key (backend {key.backend}), not held by hardware"
    if software:
        raise KeyPolicyError(
            f"{ref.public_uri} is {store}. Use a hardware token, or pass --allow-software-key "
            "for development and tests; the device is then recorded as hardware_backed = false"
        )


def check_non_extractable(key: DeviceKey) -> None:
    """Raise KeyPolicyError unless the backend confirms the private key can never leave it."""
    if key.backend not in ("pkcs11", "softhsm"):
        # The TPM backend checks fixedTPM, fixedParent and sensitiveDataOrigin when it opens a
        # key. NOTE: a serial secure element reports no key attributes, so nothing is checked.
        return
    from device_sdk.keys import pkcs11

    policy = pkcs11.key_policy(key)
    expected = {"extractable": False, "never_extractable": True, "always_sensitive": True}
    wrong = {
        name: policy.get(name) for name, value in expected.items() if policy.get(name) != value
    }
    if wrong:
        found = ", ".join(f"CKA_{name.upper()}={value}" for name, value in wrong.items())
        raise KeyPolicyError(
            f"key {key.uri} fails the non-extractable check ({found}); it may have been imported "
            "or exported once. Generate a new key on the token under another object= label"
        )


def can_store_certificate(ref: KeyReference) -> bool:
    return ref.scheme == "pkcs11"


def store_certificate(ref: KeyReference, cert_der: bytes) -> None:
    """Store the certificate on the token with the key's CKA_ID, replacing an older one."""
    from device_sdk.keys import pkcs11

    written = pkcs11.store_certificate(ref.text, cert_der, replace=True)
    logger.info("certificate for %s %s", ref.public_uri, "stored" if written else "already stored")


def find_certificate_location(ref: KeyReference, file_path: Path) -> str | None:
    """Return where an earlier run stored the key's certificate, or None."""
    if ref.scheme == "pkcs11":
        from device_sdk.keys import pkcs11

        if pkcs11.find_certificate(ref.text) is not None:
            return f"token ({ref.public_uri})"
    if file_path.exists():
        return str(file_path)
    return None
