"""Driver for a Microchip ATECC608 secure element on I2C, for MicroPython boards.

NOTE: this driver was written from the ATECC608A datasheet and Microchip's cryptoauthlib
conventions as remembered, and has never run on hardware. On CPython, its packet CRC matches
published vectors and its code paths run against a fake bus that follows the same reading of
the datasheet. Checked against no chip: the wake timing, the opcodes and modes below, the
maximum execution times, and the config zone offsets of the serial number and SlotLocked bits.

It expects a chip whose config and data zones are already locked, with P-256 private key slots
that allow GenKey and Sign of external messages (for example Microchip's TrustFLEX layout). It
never writes the config zone.

Packet on the bus: word address 0x03, then count, opcode, param1, param2 (2 bytes,
little-endian), data, CRC-16 (polynomial 0x8005, bits taken least significant first, sent
little-endian). ``count`` includes itself and the CRC. A reply is count, data, CRC.
"""

import time

from firmware_shim import protocol
from firmware_shim.device import SecureElementError

I2C_ADDRESS = 0x60

WORD_COMMAND = 0x03
WORD_SLEEP = 0x01

OP_READ = 0x02
OP_NONCE = 0x16
OP_LOCK = 0x17
OP_COUNTER = 0x24
OP_INFO = 0x30
OP_GENKEY = 0x40
OP_SIGN = 0x41

# Maximum execution times in ms (ATECC608A datasheet, table of command execution times).
EXECUTION_MS = {
    OP_READ: 1,
    OP_NONCE: 7,
    OP_LOCK: 32,
    OP_COUNTER: 20,
    OP_INFO: 1,
    OP_GENKEY: 115,
    OP_SIGN: 70,
}

GENKEY_MODE_PUBLIC = 0x00
GENKEY_MODE_PRIVATE = 0x04
NONCE_MODE_PASSTHROUGH = 0x03
SIGN_MODE_EXTERNAL = 0x80
LOCK_MODE_SLOT = 0x02
LOCK_MODE_IGNORE_CRC = 0x80
READ_ZONE_CONFIG = 0x00
READ_32_BYTES = 0x80

WAKE_REPLY = b"\x04\x11\x33\x43"
# Time from the end of the wake pulse until the chip listens (tWHI), in microseconds.
WAKE_DELAY_US = 1500

STATUS_NAMES = {
    0x01: "CheckMac or Verify miscompare",
    0x03: "parse error",
    0x05: "ECC fault",
    0x07: "self-test error",
    0x08: "health test error",
    0x0F: "execution error",
    0x11: "awake, no command yet",
    0xEE: "watchdog about to expire",
    0xFF: "CRC or communication error",
}
SLOT_COUNT = 16
COUNTER_MAX = 2097151


def atecc_crc(data: bytes) -> bytes:
    """Compute the ATECC CRC-16 over ``data`` and return it as 2 bytes, little-endian."""
    crc = 0
    for byte in data:
        bit = 1
        while bit < 0x100:
            data_bit = 1 if byte & bit else 0
            crc_bit = crc >> 15
            crc = (crc << 1) & 0xFFFF
            if data_bit != crc_bit:
                crc ^= 0x8005
            bit <<= 1
    return bytes((crc & 0xFF, crc >> 8))


def build_packet(opcode: int, param1: int, param2: int, data: bytes = b"") -> bytes:
    """Build a command packet without the word address: count, opcode, params, data, CRC."""
    body = bytearray((7 + len(data), opcode, param1, param2 & 0xFF, param2 >> 8))
    body.extend(data)
    body.extend(atecc_crc(body))
    return bytes(body)


def check_reply(reply: bytes) -> bytes:
    """Check a reply's count and CRC; return its data, or raise SecureElementError."""
    if len(reply) < 4 or reply[0] != len(reply):
        raise SecureElementError(
            protocol.SE_FAILURE, "ATECC608 reply has an invalid count byte", 0xFF
        )
    if atecc_crc(reply[:-2]) != reply[-2:]:
        raise SecureElementError(protocol.SE_FAILURE, "ATECC608 reply failed its CRC check", 0xFF)
    data = reply[1:-2]
    if len(data) == 1 and data[0] != 0x00:
        status = data[0]
        raise SecureElementError(
            protocol.SE_FAILURE,
            "ATECC608 status 0x%02X: %s" % (status, STATUS_NAMES.get(status, "unknown status")),
            status,
        )
    return data


class Atecc608:
    """The secure element interface of device.py, over an ATECC608 on ``i2c``.

    ``i2c`` is a ``machine.I2C`` at 100 kHz or less: the wake pulse is a write to address 0,
    whose 8 low bit times must last at least 60 microseconds.
    """

    kind = protocol.SE_ATECC608
    slot_count = SLOT_COUNT

    def __init__(self, i2c: object, address: int = I2C_ADDRESS):
        self.i2c = i2c
        self.address = address
        self._serial = b""

    def _wake(self) -> None:
        try:
            self.i2c.writeto(0x00, b"\x00")
        except OSError:
            pass  # Nobody acknowledges address 0; the long low pulse is what wakes the chip.
        time.sleep_us(WAKE_DELAY_US)
        reply = self.i2c.readfrom(self.address, 4)
        if bytes(reply) != WAKE_REPLY:
            raise SecureElementError(
                protocol.SE_FAILURE, "ATECC608 did not answer the wake pulse", 0xFF
            )

    def _sleep(self) -> None:
        try:
            self.i2c.writeto(self.address, bytes((WORD_SLEEP,)))
        except OSError:
            pass  # The chip falls asleep by itself when its watchdog expires.

    def _command(self, opcode: int, param1: int, param2: int, data: bytes = b"") -> bytes:
        packet = build_packet(opcode, param1, param2, data)
        self.i2c.writeto(self.address, bytes((WORD_COMMAND,)) + packet)

        # The chip does not acknowledge its address while it executes, so poll for the count.
        deadline = time.ticks_add(time.ticks_ms(), EXECUTION_MS[opcode] + 5)
        while True:
            try:
                count = self.i2c.readfrom(self.address, 1)[0]
                break
            except OSError:
                if time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                    raise SecureElementError(
                        protocol.SE_FAILURE,
                        "ATECC608 gave no reply to opcode 0x%02X in time" % opcode,
                        0xFF,
                    ) from None
                time.sleep_ms(1)
        if count < 4 or count > 80:
            raise SecureElementError(protocol.SE_FAILURE, "ATECC608 reply count %d" % count, 0xFF)
        rest = self.i2c.readfrom(self.address, count - 1)
        return check_reply(bytes((count,)) + bytes(rest))

    def _run(self, steps: list) -> bytes:
        """Run (opcode, param1, param2, data) steps in one wake period; return the last reply.

        Nonce then Sign must share a wake period, because TempKey is cleared by sleep.
        """
        self._wake()
        try:
            result = b""
            for opcode, param1, param2, data in steps:
                result = self._command(opcode, param1, param2, data)
            return result
        finally:
            self._sleep()

    def _read_config_block(self, block: int) -> bytes:
        return self._run([(OP_READ, READ_ZONE_CONFIG | READ_32_BYTES, block << 3, b"")])

    def serial_number(self) -> bytes:
        if not self._serial:
            block = self._read_config_block(0)
            self._serial = bytes(block[0:4]) + bytes(block[8:13])
        return self._serial

    def slot_locked(self, slot: int) -> bool:
        # SlotLocked is config bytes 88 and 89 (block 2, offsets 24 and 25); a 0 bit is locked.
        block = self._read_config_block(2)
        bits = block[24] | (block[25] << 8)
        return not bits & (1 << slot)

    def public_key(self, slot: int) -> bytes:
        try:
            key = self._run([(OP_GENKEY, GENKEY_MODE_PUBLIC, slot, b"")])
        except SecureElementError as exc:
            # NOTE: assumed: an empty or invalid private key slot fails with an execution error.
            # A factory-fresh slot may instead hold a value that yields some public key.
            if exc.detail == 0x0F:
                raise SecureElementError(
                    protocol.SLOT_EMPTY, "slot %d holds no key" % slot
                ) from exc
            raise
        return self._check_key(key)

    def generate(self, slot: int) -> bytes:
        return self._check_key(self._run([(OP_GENKEY, GENKEY_MODE_PRIVATE, slot, b"")]))

    def _check_key(self, key: bytes) -> bytes:
        if len(key) != 64:
            raise SecureElementError(
                protocol.SE_FAILURE, "ATECC608 returned a %d-byte public key" % len(key), 0xFF
            )
        return bytes(key)

    def sign(self, slot: int, digest: bytes) -> bytes:
        signature = self._run(
            [
                (OP_NONCE, NONCE_MODE_PASSTHROUGH, 0, bytes(digest)),
                (OP_SIGN, SIGN_MODE_EXTERNAL, slot, b""),
            ]
        )
        if len(signature) != 64:
            raise SecureElementError(
                protocol.SE_FAILURE, "ATECC608 returned a %d-byte signature" % len(signature), 0xFF
            )
        return bytes(signature)

    def counter(self, counter_id: int, increment: bool) -> int:
        value = self._run([(OP_COUNTER, 1 if increment else 0, counter_id, b"")])
        result = int.from_bytes(bytes(value[:4]), "little")
        if increment and result > COUNTER_MAX:
            raise SecureElementError(
                protocol.COUNTER_EXHAUSTED, "counter %d is at its maximum" % counter_id
            )
        return result

    def lock_slot(self, slot: int) -> None:
        mode = LOCK_MODE_SLOT | (slot << 2) | LOCK_MODE_IGNORE_CRC
        self._run([(OP_LOCK, mode, 0, b"")])
