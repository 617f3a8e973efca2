"""A software secure element for the simulator: host only, never copied to a board.

P-256 keys are made and used with ``cryptography`` inside the simulator process; only public keys
and signatures leave it over the link. The state directory plays the part of the element's
EEPROM: one PKCS#8 PEM file per slot (mode 0600), and ``state.json`` with the serial number,
counters and slot locks. Every change is written atomically before the reply is sent, so a
restart keeps keys, locks and counters, and a counter never goes back.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from firmware_shim import protocol
from firmware_shim.device import SecureElementError

logger = logging.getLogger(__name__)

DEFAULT_SLOT_COUNT = 16
# The ATECC608 monotonic counters stop at 2,097,151; the software element keeps the same limit.
COUNTER_MAX = 2_097_151


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class SoftwareSecureElement:
    """A secure element in software, with its state in ``state_dir``."""

    kind = protocol.SE_SOFTWARE

    def __init__(self, state_dir: Path, slot_count: int = DEFAULT_SLOT_COUNT) -> None:
        self.state_dir = state_dir
        self.slot_count = slot_count
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._state_path = state_dir / "state.json"
        self._keys: dict[int, ec.EllipticCurvePrivateKey] = {}
        self._load()

    def _load(self) -> None:
        if self._state_path.exists():
            state = json.loads(self._state_path.read_text())
            self._serial = bytes.fromhex(state["serial"])
            self._counters = [int(value) for value in state["counters"]]
            self._locked = {int(slot) for slot in state["locked"]}
        else:
            self._serial = secrets.token_bytes(9)
            self._counters = [0, 0]
            self._locked = set()
            self._save_state()
        for slot in range(self.slot_count):
            path = self._key_path(slot)
            if path.exists():
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
                if not isinstance(key, ec.EllipticCurvePrivateKey):
                    raise ValueError(f"{path} does not hold an EC private key")
                self._keys[slot] = key
        logger.info(
            "software secure element %s: %d keys, counters %s, locked slots %s",
            self._serial.hex(),
            len(self._keys),
            self._counters,
            sorted(self._locked),
        )

    def _key_path(self, slot: int) -> Path:
        return self.state_dir / f"slot-{slot}.pem"

    def _save_state(self) -> None:
        state = {
            "serial": self._serial.hex(),
            "counters": self._counters,
            "locked": sorted(self._locked),
        }
        _write_atomic(self._state_path, json.dumps(state, indent=1).encode())

    def serial_number(self) -> bytes:
        return self._serial

    def public_key(self, slot: int) -> bytes:
        key = self._keys.get(slot)
        if key is None:
            raise SecureElementError(protocol.SLOT_EMPTY, f"slot {slot} holds no key")
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return point[1:]

    def generate(self, slot: int) -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_atomic(self._key_path(slot), pem)
        self._keys[slot] = key
        logger.info("generated a P-256 key in slot %d", slot)
        return self.public_key(slot)

    def sign(self, slot: int, digest: bytes) -> bytes:
        key = self._keys.get(slot)
        if key is None:
            raise SecureElementError(protocol.SLOT_EMPTY, f"slot {slot} holds no key")
        der = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def counter(self, counter_id: int, increment: bool) -> int:
        if not increment:
            return self._counters[counter_id]
        if self._counters[counter_id] >= COUNTER_MAX:
            raise SecureElementError(
                protocol.COUNTER_EXHAUSTED,
                f"counter {counter_id} reached its maximum {COUNTER_MAX}",
            )
        self._counters[counter_id] += 1
        self._save_state()
        return self._counters[counter_id]

    def slot_locked(self, slot: int) -> bool:
        return slot in self._locked

    def lock_slot(self, slot: int) -> None:
        self._locked.add(slot)
        self._save_state()
        logger.info("locked slot %d", slot)
