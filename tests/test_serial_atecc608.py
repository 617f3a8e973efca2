"""The ATECC608 driver against a fake I2C bus that models the chip's packet interface.

The fake follows the same reading of the datasheet as the driver. So these tests catch mistakes
in the driver's code paths (wake, busy polling, packet CRCs, Nonce and Sign in one wake period,
status bytes), but not misreadings of the datasheet. The driver has never run on a real chip.
"""

from __future__ import annotations

import time as host_time
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from firmware_shim import atecc608, protocol
from firmware_shim.device import Device, SecureElementError

SERIAL = bytes.fromhex("0123") + bytes.fromhex("4567") + bytes.fromhex("89abcdef01")


def micropython_time() -> SimpleNamespace:
    """The parts of MicroPython's time module that the driver uses, built on CPython's."""

    def ticks_ms() -> int:
        return host_time.monotonic_ns() // 1_000_000

    return SimpleNamespace(
        ticks_ms=ticks_ms,
        ticks_add=lambda ticks, delta: ticks + delta,
        ticks_diff=lambda end, start: end - start,
        sleep_ms=lambda ms: host_time.sleep(ms / 1000),
        sleep_us=lambda us: host_time.sleep(us / 1_000_000),
    )


class FakeAtecc608Bus:
    """A machine.I2C stand-in with one ATECC608 at 0x60."""

    def __init__(self) -> None:
        self.awake = False
        self.reply = b""
        # The chip ignores its address until it has executed the command (2 ms here).
        self.busy_until = 0.0
        self.temp_key: bytes | None = None
        self.keys: dict[int, ec.EllipticCurvePrivateKey] = {}
        self.counters = [0, 0]
        self.slot_locked_bits = 0xFFFF
        self.commands: list[int] = []

    def writeto(self, address: int, data: bytes) -> None:
        if address == 0x00:
            self.awake = True
            self.reply = atecc608.WAKE_REPLY
            raise OSError(19, "no device acknowledged address 0")
        assert address == atecc608.I2C_ADDRESS
        assert self.awake, "command sent to a sleeping chip"
        word = data[0]
        if word == atecc608.WORD_SLEEP:
            self.awake = False
            self.temp_key = None
            return
        assert word == atecc608.WORD_COMMAND
        packet = bytes(data[1:])
        assert packet[0] == len(packet)
        assert atecc608.atecc_crc(packet[:-2]) == packet[-2:]
        opcode, mode = packet[1], packet[2]
        param2 = packet[3] | (packet[4] << 8)
        self.commands.append(opcode)
        result = self._execute(opcode, mode, param2, packet[5:-2])
        self.reply = bytes((len(result) + 3,)) + result
        self.reply += atecc608.atecc_crc(self.reply)
        self.busy_until = host_time.monotonic() + 0.002

    def readfrom(self, address: int, size: int) -> bytes:
        assert address == atecc608.I2C_ADDRESS
        if host_time.monotonic() < self.busy_until:
            raise OSError(19, "busy: address not acknowledged")
        chunk, self.reply = self.reply[:size], self.reply[size:]
        return chunk

    def _status(self, code: int) -> bytes:
        return bytes((code,))

    def _execute(self, opcode: int, mode: int, param2: int, data: bytes) -> bytes:
        if opcode == atecc608.OP_READ:
            config = bytearray(128)
            config[0:4] = SERIAL[0:4]
            config[8:13] = SERIAL[4:9]
            config[88] = self.slot_locked_bits & 0xFF
            config[89] = self.slot_locked_bits >> 8
            block = param2 >> 3
            return bytes(config[block * 32 : block * 32 + 32])
        if opcode == atecc608.OP_GENKEY:
            if mode == atecc608.GENKEY_MODE_PRIVATE:
                if not self.slot_locked_bits & (1 << param2):
                    return self._status(0x0F)
                self.keys[param2] = ec.generate_private_key(ec.SECP256R1())
            key = self.keys.get(param2)
            if key is None:
                return self._status(0x0F)
            numbers = key.public_key().public_numbers()
            return numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")
        if opcode == atecc608.OP_NONCE:
            assert mode == atecc608.NONCE_MODE_PASSTHROUGH
            assert len(data) == 32
            self.temp_key = data
            return self._status(0x00)
        if opcode == atecc608.OP_SIGN:
            assert mode == atecc608.SIGN_MODE_EXTERNAL
            if self.temp_key is None or param2 not in self.keys:
                return self._status(0x0F)
            der = self.keys[param2].sign(self.temp_key, ec.ECDSA(Prehashed(hashes.SHA256())))
            self.temp_key = None
            r, s = decode_dss_signature(der)
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        if opcode == atecc608.OP_COUNTER:
            if mode == 1:
                self.counters[param2] += 1
            return self.counters[param2].to_bytes(4, "little")
        if opcode == atecc608.OP_LOCK:
            assert mode & 0x03 == atecc608.LOCK_MODE_SLOT
            assert mode & atecc608.LOCK_MODE_IGNORE_CRC
            self.slot_locked_bits &= ~(1 << ((mode >> 2) & 0x0F))
            return self._status(0x00)
        return self._status(0x03)


@pytest.fixture
def bus(monkeypatch: pytest.MonkeyPatch) -> FakeAtecc608Bus:
    monkeypatch.setattr(atecc608, "time", micropython_time())
    return FakeAtecc608Bus()


def request(device: Device, command: int, payload: bytes) -> protocol.Frame:
    (reply,) = device.receive(protocol.encode_frame(1, command, 0, payload), 0)
    return protocol.decode_body(reply[1:-1])


def test_serial_number_from_config(bus: FakeAtecc608Bus) -> None:
    assert atecc608.Atecc608(bus).serial_number() == SERIAL
    assert bus.awake is False


def test_generate_sign_verify(bus: FakeAtecc608Bus) -> None:
    device = Device(atecc608.Atecc608(bus))

    generated = request(device, protocol.GENERATE_KEY, bytes((2, protocol.ALGORITHM_P256, 0)))
    digest = bytes(range(32))
    signed = request(device, protocol.SIGN_DIGEST, b"\x02" + digest)

    assert generated.status == protocol.OK
    assert signed.status == protocol.OK
    public = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), b"\x04" + generated.payload
    )
    r = int.from_bytes(signed.payload[:32], "big")
    s = int.from_bytes(signed.payload[32:], "big")
    public.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    # Nonce and Sign ran in one wake period; the chip then went back to sleep.
    assert bus.commands[-2:] == [atecc608.OP_NONCE, atecc608.OP_SIGN]
    assert bus.awake is False


def test_empty_slot_reported(bus: FakeAtecc608Bus) -> None:
    device = Device(atecc608.Atecc608(bus))

    reply = request(device, protocol.GET_PUBLIC_KEY, b"\x05")

    assert reply.status == protocol.SLOT_EMPTY
    assert reply.payload[1:] == b"slot 5 holds no key"


def test_counter_little_endian(bus: FakeAtecc608Bus) -> None:
    element = atecc608.Atecc608(bus)
    bus.counters[1] = 0x00102030

    assert element.counter(1, False) == 0x00102030
    assert element.counter(1, True) == 0x00102031


def test_lock_refuses_new_key(bus: FakeAtecc608Bus) -> None:
    device = Device(atecc608.Atecc608(bus))
    request(device, protocol.GENERATE_KEY, bytes((0, protocol.ALGORITHM_P256, 0)))

    locked = request(device, protocol.LOCK_SLOT, b"\x00")
    again = request(device, protocol.GENERATE_KEY, bytes((0, protocol.ALGORITHM_P256, 1)))

    assert locked.payload == b"\x01"
    assert bus.slot_locked_bits == 0xFFFE
    assert again.status == protocol.SLOT_LOCKED


def test_chip_status_reported(bus: FakeAtecc608Bus) -> None:
    element = atecc608.Atecc608(bus)

    with pytest.raises(SecureElementError, match="ATECC608 status 0x0F: execution error") as caught:
        element.sign(3, bytes(32))
    assert caught.value.detail == 0x0F
    assert bus.awake is False
