"""Command dispatch of the firmware: frames in, replies out, over any secure element.

Runs on the board under MicroPython and in the host simulator, so it keeps to builtins. A secure
element object provides:

    kind            SE_ATECC608 or SE_SOFTWARE
    slot_count      number of key slots
    serial_number() -> bytes
    public_key(slot) -> 64 bytes X || Y, or raises SecureElementError(SLOT_EMPTY)
    generate(slot) -> 64 bytes X || Y of a new P-256 key made inside the element
    sign(slot, digest) -> 64 bytes r || s over a 32-byte digest
    counter(counter_id, increment) -> int
    slot_locked(slot) -> bool
    lock_slot(slot) -> None
"""

from firmware_shim import protocol

FIRMWARE_VERSION = (1, 0, 0)
CAPABILITIES = (
    protocol.CAP_SIGN_P256 | protocol.CAP_GENERATE | protocol.CAP_COUNTER | protocol.CAP_LOCK_SLOT
)
COUNTER_IDS = (0, 1)


class SecureElementError(Exception):
    """A secure element refused or failed an operation; ``status`` is the protocol status.

    ``detail`` is an extra status byte from the element (the ATECC608 status) or 0.
    """

    def __init__(self, status: int, message: str, detail: int = 0):
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


def error_payload(detail: int, message: str) -> bytes:
    """Build an error reply's payload: one detail byte, then the message in UTF-8."""
    return bytes((detail & 0xFF,)) + message.encode()[: protocol.MAX_PAYLOAD - 1]


class Device:
    """The firmware's protocol endpoint over one secure element."""

    def __init__(self, element: object, capabilities: int = CAPABILITIES):
        self.element = element
        self.capabilities = capabilities
        self.reader = protocol.FrameReader()

    def receive(self, data: bytes, now_ms: int) -> list:
        """Consume bytes from the host; return the wire replies to send, in order."""
        replies = []
        for event in self.reader.feed(data, now_ms):
            replies.append(self.handle_event(event))
        return replies

    def poll(self, now_ms: int) -> list:
        """Drop a partial frame that timed out; return the error reply for it, if any."""
        error = self.reader.expire(now_ms)
        if error is None:
            return []
        return [self.handle_event(error)]

    def handle_event(self, event: object) -> bytes:
        """Turn one frame or frame error into the wire bytes of its reply."""
        if isinstance(event, protocol.FrameError):
            return self.error_reply(event)
        return self.dispatch(event)

    def error_reply(self, error: protocol.FrameError) -> bytes:
        """Report a frame that could not be used; seq 0 and kind 0x80 when they are unknown."""
        if error.seq >= 0 and error.kind >= 0:
            seq = error.seq
            kind = (error.kind | protocol.REPLY_BIT) & 0xFF
        else:
            seq = protocol.FRAME_ERROR_SEQ
            kind = protocol.FRAME_ERROR_KIND
        return protocol.encode_frame(seq, kind, error.status, error_payload(0, error.message))

    def dispatch(self, frame: protocol.Frame) -> bytes:
        """Run one request frame and return the wire bytes of its reply."""
        kind = frame.kind | protocol.REPLY_BIT
        handler = self._handlers().get(frame.kind)
        if handler is None or frame.kind & protocol.REPLY_BIT:
            message = "unknown command 0x%02X" % frame.kind
            return protocol.encode_frame(
                frame.seq, kind, protocol.UNKNOWN_COMMAND, error_payload(0, message)
            )
        try:
            payload = handler(frame.payload)
        except SecureElementError as exc:
            return protocol.encode_frame(
                frame.seq, kind, exc.status, error_payload(exc.detail, exc.message)
            )
        except Exception as exc:  # noqa: BLE001 - the firmware must keep serving after a fault
            # An I2C error (OSError) or a bug in a handler: report it and keep the link alive.
            self.report_internal_error(exc)
            message = "%s: %s" % (type(exc).__name__, exc)
            return protocol.encode_frame(
                frame.seq, kind, protocol.INTERNAL_ERROR, error_payload(0, message)
            )
        return protocol.encode_frame(frame.seq, kind, protocol.OK, payload)

    def report_internal_error(self, error: Exception) -> None:
        """Hook for an unexpected exception in a handler; the simulator logs it."""

    def _handlers(self) -> dict:
        return {
            protocol.HELLO: self.hello,
            protocol.GET_PUBLIC_KEY: self.get_public_key,
            protocol.GENERATE_KEY: self.generate_key,
            protocol.SIGN_DIGEST: self.sign_digest,
            protocol.COUNTER: self.counter,
            protocol.LOCK_SLOT: self.lock_slot,
        }

    def hello(self, payload: bytes) -> bytes:
        element = self.element
        serial = element.serial_number()
        out = bytearray((protocol.PROTOCOL_VERSION,))
        out.extend(bytes(FIRMWARE_VERSION))
        out.extend(self.capabilities.to_bytes(2, "big"))
        out.append(element.slot_count)
        out.append(element.kind)
        out.append(len(serial))
        out.extend(serial)
        out.extend(protocol.MAX_PAYLOAD.to_bytes(2, "big"))
        return bytes(out)

    def _slot(self, payload: bytes, size: int) -> int:
        if len(payload) != size:
            raise SecureElementError(
                protocol.BAD_ARGUMENT,
                "payload of %d bytes where %d are expected" % (len(payload), size),
            )
        slot = payload[0]
        count = self.element.slot_count
        if slot >= count:
            raise SecureElementError(
                protocol.BAD_SLOT, "slot %d does not exist; slots are 0 to %d" % (slot, count - 1)
            )
        return slot

    def get_public_key(self, payload: bytes) -> bytes:
        slot = self._slot(payload, 1)
        flags = 1 if self.element.slot_locked(slot) else 0
        return bytes((flags,)) + self.element.public_key(slot)

    def generate_key(self, payload: bytes) -> bytes:
        if len(payload) != 3:
            raise SecureElementError(
                protocol.BAD_ARGUMENT, "GENERATE_KEY takes 3 bytes: slot, algorithm, flags"
            )
        slot = self._slot(payload[:1], 1)
        algorithm, flags = payload[1], payload[2]
        if algorithm != protocol.ALGORITHM_P256:
            raise SecureElementError(
                protocol.BAD_ARGUMENT, "algorithm %d is not supported; use 1 (P-256)" % algorithm
            )
        element = self.element
        if element.slot_locked(slot):
            raise SecureElementError(
                protocol.SLOT_LOCKED, "slot %d is locked against new keys" % slot
            )
        if not flags & protocol.GENERATE_REPLACE and self._has_key(slot):
            raise SecureElementError(protocol.SLOT_OCCUPIED, "slot %d already holds a key" % slot)
        return element.generate(slot)

    def _has_key(self, slot: int) -> bool:
        try:
            self.element.public_key(slot)
        except SecureElementError as exc:
            if exc.status == protocol.SLOT_EMPTY:
                return False
            raise
        return True

    def sign_digest(self, payload: bytes) -> bytes:
        slot = self._slot(payload[:1], 1)
        digest = payload[1:]
        if len(digest) != 32:
            raise SecureElementError(
                protocol.BAD_ARGUMENT,
                "digest of %d bytes; the element signs 32-byte digests" % len(digest),
            )
        return self.element.sign(slot, digest)

    def counter(self, payload: bytes) -> bytes:
        if len(payload) != 2 or payload[0] not in COUNTER_IDS or payload[1] > 1:
            raise SecureElementError(
                protocol.BAD_ARGUMENT,
                "COUNTER takes 2 bytes: counter id 0 or 1, mode 0 (read) or 1 (increment)",
            )
        increment = payload[1] == protocol.COUNTER_INCREMENT
        value = self.element.counter(payload[0], increment)
        return int(value).to_bytes(4, "big")

    def lock_slot(self, payload: bytes) -> bytes:
        slot = self._slot(payload, 1)
        element = self.element
        if element.slot_locked(slot):
            return b"\x00"
        if not self._has_key(slot):
            raise SecureElementError(
                protocol.SLOT_EMPTY,
                "slot %d holds no key; locking it would leave it empty for good" % slot,
            )
        element.lock_slot(slot)
        return b"\x01"
