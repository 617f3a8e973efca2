"""Keys in a secure element behind a serial link (the ``firmware_shim`` firmware), over pyserial.

    key = open_key("serial:/dev/serial/by-id/usb-...-if00?baud=115200&slot=0")
    key.sign(data, ec.ECDSA(hashes.SHA256()))   # DER, signed inside the secure element
    key.counter()                               # increments and returns the monotonic counter
    generate_key("serial:/dev/ttyACM0?slot=1", "ec-p256")

Keys are ECDSA P-256 and sign SHA-256 digests only, as the ATECC608 does. Keys that share a
device path share one :class:`~device_sdk.keys.serial_link.SerialLink`, so commands from all
threads run one at a time. Give a path that stays the same across resets: a udev
``/dev/serial/by-id/`` link for a board, or the simulator's ``--link`` path.

``hardware_backed`` comes from the firmware's HELLO reply: True for an ATECC608, False for the
simulator's software element. The firmware's claim is not attested.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, NoReturn

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding

from device_sdk.errors import (
    ConfigError,
    KeyExistsError,
    KeyNotFoundError,
    SerialDeviceError,
    SerialLinkError,
)
from device_sdk.keys.serial_link import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    DeviceInfo,
    SerialLink,
)
from device_sdk.keys.signing import HardwareECKey
from device_sdk.keys.uri import SerialURI
from firmware_shim import protocol

logger = logging.getLogger(__name__)

__all__ = [
    "ALGORITHMS",
    "DeviceInfo",
    "SerialECKey",
    "SerialLink",
    "SerialSigner",
    "close_links",
    "device_info",
    "generate_key",
    "get_link",
    "open_key",
]

BACKEND = "serial"
ALGORITHMS = {"ec-p256": protocol.ALGORITHM_P256}
# Seconds to wait for GENERATE_KEY; key generation is the slowest command on every element.
GENERATE_TIMEOUT = 5.0

_links: dict[str, SerialLink] = {}
_links_lock = threading.Lock()


def get_link(
    device: str,
    baud: int = 115200,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> SerialLink:
    """Return the process's link to ``device``, creating it on first use.

    ``timeout`` and ``connect_timeout`` apply when the link is created; later calls share it.
    """
    with _links_lock:
        link = _links.get(device)
        if link is None:
            link = SerialLink(device, baud, timeout=timeout, connect_timeout=connect_timeout)
            _links[device] = link
        elif link.baud != baud:
            raise ConfigError(
                f"{device} is already open at {link.baud} baud in this process, not {baud}; "
                "use the same baud= in every serial: URI for one device"
            )
        return link


def close_links() -> None:
    """Close every link of this process; the next use of a key opens its port again."""
    with _links_lock:
        links = list(_links.values())
        _links.clear()
    for link in links:
        link.close()


class SerialSigner:
    """Signs digests with the key in one slot of a serial secure element."""

    def __init__(self, link: SerialLink, slot: int, public_point: bytes) -> None:
        self.link = link
        self.slot = slot
        self.public_point = public_point
        self.location = f"the serial secure element at {link.device} (slot {slot})"

    def sign_ecdsa_digest(self, digest: bytes) -> bytes:
        if len(digest) != 32:
            raise UnsupportedAlgorithm(
                f"{self.location} signs 32-byte digests only, not {len(digest)} bytes; "
                "use ec.ECDSA(hashes.SHA256())"
            )
        try:
            signature = self.link.request(
                protocol.SIGN_DIGEST,
                bytes((self.slot,)) + digest,
                expected_key=(self.slot, self.public_point),
            )
        except SerialDeviceError as exc:
            _raise_slot_error(exc, self.link, self.slot)
        if len(signature) != 64:
            raise SerialLinkError(
                f"{self.location} returned a {len(signature)}-byte signature; expected 64 bytes"
            )
        return signature

    def sign_eddsa(self, data: bytes) -> bytes:
        raise UnsupportedAlgorithm(f"{self.location} supports only ECDSA P-256 keys")

    def sign_rsa_digest(
        self,
        digest: bytes,
        algorithm: hashes.HashAlgorithm,
        pad: padding.AsymmetricPadding,
        salt_length: int | None,
    ) -> bytes:
        raise UnsupportedAlgorithm(f"{self.location} supports only ECDSA P-256 keys")


class SerialECKey(HardwareECKey):
    """A P-256 key in a serial secure element, with the element's monotonic counter."""

    def __init__(
        self, signer: SerialSigner, public_key: ec.EllipticCurvePublicKey, *, uri: str
    ) -> None:
        super().__init__(
            signer,
            public_key,
            uri=uri,
            backend=BACKEND,
            hardware_backed=signer.link.info.hardware_backed,
        )
        self.link = signer.link
        self.slot = signer.slot
        self._expected_key = (signer.slot, signer.public_point)

    def counter(self, *, increment: bool = True, counter_id: int = 0) -> int:
        """Return the element's monotonic counter, incremented first unless ``increment`` is False.

        The counter belongs to the element, not to the slot. A verifier that stores the last
        value it saw detects a cloned device when a value does not grow. An increment is never
        sent twice, even after a lost link.
        """
        if counter_id not in (0, 1):
            raise ConfigError(f"invalid counter_id {counter_id}: the element has counters 0 and 1")
        mode = protocol.COUNTER_INCREMENT if increment else protocol.COUNTER_READ
        reply = self.link.request(
            protocol.COUNTER,
            bytes((counter_id, mode)),
            repeatable=not increment,
            expected_key=self._expected_key,
        )
        if len(reply) != 4:
            raise SerialLinkError(
                f"COUNTER reply from {self.link.device} has {len(reply)} bytes; expected 4"
            )
        return int.from_bytes(reply, "big")

    def is_locked(self) -> bool:
        """Return whether the slot is locked against new keys."""
        reply = self.link.request(protocol.GET_PUBLIC_KEY, bytes((self.slot,)))
        return bool(reply[0] & 1)

    def lock(self) -> bool:
        """Lock the slot so that no new key can replace this one; False if it was locked already.

        Locking cannot be undone, on an ATECC608 or in the simulator.
        """
        reply = self.link.request(
            protocol.LOCK_SLOT,
            bytes((self.slot,)),
            repeatable=False,
            expected_key=self._expected_key,
        )
        locked_now = reply[:1] == b"\x01"
        logger.info(
            "slot %d of %s %s",
            self.slot,
            self.link.device,
            "locked" if locked_now else "was already locked",
        )
        return locked_now

    def device_info(self) -> DeviceInfo:
        return self.link.info

    def __repr__(self) -> str:
        return f"<SerialECKey {self.curve.name} {self.uri}>"


def _parse(uri: str | SerialURI) -> SerialURI:
    return uri if isinstance(uri, SerialURI) else SerialURI.parse(uri)


def _raise_slot_error(exc: SerialDeviceError, link: SerialLink, slot: int) -> NoReturn:
    where = f"slot {slot} of the serial secure element at {link.device}"
    if exc.status == protocol.SLOT_EMPTY:
        raise KeyNotFoundError(
            f"{where} is empty; create one with generate_key() or device-sdk provision"
        ) from exc
    if exc.status == protocol.SLOT_OCCUPIED:
        raise KeyExistsError(
            f"{where} already contains a key; open it with open_key(), or choose another slot="
        ) from exc
    if exc.status == protocol.BAD_SLOT:
        raise ConfigError(
            f"{where} does not exist: the element has {link.info.slot_count} slots, "
            f"0 to {link.info.slot_count - 1}"
        ) from exc
    raise exc


def _public_key(point: bytes, link: SerialLink, slot: int) -> ec.EllipticCurvePublicKey:
    if len(point) != 64:
        raise SerialLinkError(
            f"slot {slot} of {link.device} returned a {len(point)}-byte public key; expected 64"
        )
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + point)
    except ValueError as exc:
        raise SerialLinkError(
            f"slot {slot} of {link.device} returned a public key that is not a P-256 point"
        ) from exc


def _open(parsed: SerialURI, point: bytes, link: SerialLink) -> SerialECKey:
    public_key = _public_key(point, link, parsed.slot)
    link.key_seen(parsed.slot, point)
    return SerialECKey(SerialSigner(link, parsed.slot, point), public_key, uri=str(parsed))


def open_key(
    uri: str | SerialURI,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    **options: Any,
) -> SerialECKey:
    """Open the key in the URI's slot; raise KeyNotFoundError when the slot is empty."""
    if options:
        raise ConfigError(
            f"unknown options for a serial: key: {', '.join(sorted(options))}; "
            "use timeout= and connect_timeout="
        )
    parsed = _parse(uri)
    link = get_link(parsed.device, parsed.baud, timeout=timeout, connect_timeout=connect_timeout)
    try:
        reply = link.request(protocol.GET_PUBLIC_KEY, bytes((parsed.slot,)))
    except SerialDeviceError as exc:
        _raise_slot_error(exc, link, parsed.slot)
    return _open(parsed, reply[1:], link)


def generate_key(
    uri: str | SerialURI,
    algorithm: str = "ec-p256",
    *,
    replace: bool = False,
    timeout: float = GENERATE_TIMEOUT,
) -> SerialECKey:
    """Create a key inside the element in the URI's slot and return it opened.

    Raises KeyExistsError when the slot holds a key (unless ``replace``), and SerialDeviceError
    with ``status_name`` SLOT_LOCKED when the slot is locked against new keys.
    """
    code = ALGORITHMS.get(algorithm)
    if code is None:
        raise ConfigError(f"the serial secure element cannot make {algorithm!r} keys; use ec-p256")
    parsed = _parse(uri)
    link = get_link(parsed.device, parsed.baud)
    flags = protocol.GENERATE_REPLACE if replace else 0
    payload = bytes((parsed.slot, code, flags))
    try:
        point = link.request(protocol.GENERATE_KEY, payload, timeout=timeout, repeatable=False)
    except SerialDeviceError as exc:
        if exc.status == protocol.SLOT_LOCKED:
            raise SerialDeviceError(
                f"slot {parsed.slot} of the serial secure element at {link.device} is locked "
                "against new keys; use the key it holds, or choose another slot=",
                status=exc.status,
                status_name=exc.status_name,
            ) from exc
        _raise_slot_error(exc, link, parsed.slot)
    logger.info("generated a P-256 key in slot %d of %s", parsed.slot, link.device)
    return _open(parsed, point, link)


def device_info(uri: str | SerialURI) -> DeviceInfo:
    """Return the firmware's HELLO reply for the device in ``uri``."""
    parsed = _parse(uri)
    return get_link(parsed.device, parsed.baud).info
