"""Link protocol version 1 between a host and the secure-element firmware: framing and codes.

This module runs on the board under MicroPython and on the host under CPython, so it uses only
builtins: no typing, struct, f-strings or bytes.hex(). Annotations name builtin types only,
because MicroPython parses annotations and ignores them. docs/firmware-protocol.md is the
specification; the layout in short:

    wire:  0x00 | COBS(body || CRC-16) | 0x00
    body:  version u8 | seq u8 | kind u8 | status u8 | length u16 BE | payload (length bytes)

``kind`` is the command in a request and the command with bit 7 set in a reply. The CRC is
CRC-16/CCITT-FALSE (polynomial 0x1021, initial value 0xFFFF) over the body, sent big-endian.
"""

PROTOCOL_VERSION = 1

HEADER_SIZE = 6
CRC_SIZE = 2
MAX_PAYLOAD = 240
MAX_BODY = HEADER_SIZE + MAX_PAYLOAD + CRC_SIZE
# COBS adds one byte per 254 data bytes, plus one.
MAX_ENCODED = MAX_BODY + MAX_BODY // 254 + 1
DELIMITER = 0

# A partial frame is dropped when no byte of it arrived for this long.
FRAME_GAP_TIMEOUT_MS = 200

# Commands. A reply's kind is the command | REPLY_BIT.
HELLO = 0x01
GET_PUBLIC_KEY = 0x02
GENERATE_KEY = 0x03
SIGN_DIGEST = 0x04
COUNTER = 0x05
LOCK_SLOT = 0x06
# Simulator only: corrupt the next reply on purpose. Firmware on a board replies UNKNOWN_COMMAND.
FAULT = 0x7F
REPLY_BIT = 0x80
# Kind of the reply to a frame that could not be read far enough to know its command or seq.
FRAME_ERROR_KIND = 0x80
FRAME_ERROR_SEQ = 0

COMMAND_NAMES = {
    HELLO: "HELLO",
    GET_PUBLIC_KEY: "GET_PUBLIC_KEY",
    GENERATE_KEY: "GENERATE_KEY",
    SIGN_DIGEST: "SIGN_DIGEST",
    COUNTER: "COUNTER",
    LOCK_SLOT: "LOCK_SLOT",
    FAULT: "FAULT",
}

# Status codes.
OK = 0x00
UNKNOWN_COMMAND = 0x01
BAD_CRC = 0x02
BAD_FRAME = 0x03
FRAME_TOO_LONG = 0x04
BAD_LENGTH = 0x05
FRAME_TIMEOUT = 0x06
UNSUPPORTED_VERSION = 0x07
BAD_ARGUMENT = 0x08
BAD_SLOT = 0x09
SLOT_EMPTY = 0x0A
SLOT_OCCUPIED = 0x0B
SLOT_LOCKED = 0x0C
COUNTER_EXHAUSTED = 0x0D
SE_FAILURE = 0x0E
INTERNAL_ERROR = 0x0F

STATUS_NAMES = {
    OK: "OK",
    UNKNOWN_COMMAND: "UNKNOWN_COMMAND",
    BAD_CRC: "BAD_CRC",
    BAD_FRAME: "BAD_FRAME",
    FRAME_TOO_LONG: "FRAME_TOO_LONG",
    BAD_LENGTH: "BAD_LENGTH",
    FRAME_TIMEOUT: "FRAME_TIMEOUT",
    UNSUPPORTED_VERSION: "UNSUPPORTED_VERSION",
    BAD_ARGUMENT: "BAD_ARGUMENT",
    BAD_SLOT: "BAD_SLOT",
    SLOT_EMPTY: "SLOT_EMPTY",
    SLOT_OCCUPIED: "SLOT_OCCUPIED",
    SLOT_LOCKED: "SLOT_LOCKED",
    COUNTER_EXHAUSTED: "COUNTER_EXHAUSTED",
    SE_FAILURE: "SE_FAILURE",
    INTERNAL_ERROR: "INTERNAL_ERROR",
}

# Capability bits in the HELLO reply.
CAP_SIGN_P256 = 0x0001
CAP_GENERATE = 0x0002
CAP_COUNTER = 0x0004
CAP_LOCK_SLOT = 0x0008
CAP_FAULT_INJECTION = 0x0100

# Secure element kinds in the HELLO reply.
SE_ATECC608 = 1
SE_SOFTWARE = 2
SE_KIND_NAMES = {SE_ATECC608: "ATECC608", SE_SOFTWARE: "software"}

ALGORITHM_P256 = 1
GENERATE_REPLACE = 0x01
COUNTER_READ = 0
COUNTER_INCREMENT = 1


def status_name(status: int) -> str:
    """Return the name of a status code, or UNKNOWN_STATUS for a code this version lacks."""
    return STATUS_NAMES.get(status, "UNKNOWN_STATUS")


def command_name(command: int) -> str:
    """Return the name of a command code, or UNKNOWN_COMMAND for a code this version lacks."""
    return COMMAND_NAMES.get(command, "UNKNOWN_COMMAND")


def _make_crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            if crc & 0x8000:
                crc = ((crc << 1) ^ 0x1021) & 0xFFFF
            else:
                crc = (crc << 1) & 0xFFFF
        table.append(crc)
    return table


_CRC_TABLE = _make_crc_table()


def crc16(data: bytes | bytearray) -> int:
    """Compute CRC-16/CCITT-FALSE; the check value of b"123456789" is 0x29B1."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


def cobs_encode(data: bytes) -> bytes:
    """Encode ``data`` with Consistent Overhead Byte Stuffing, so the output has no zero byte."""
    out = bytearray(1)
    code_index = 0
    code = 1
    last = len(data) - 1
    for index, byte in enumerate(data):
        if byte == 0:
            out[code_index] = code
            code_index = len(out)
            out.append(0)
            code = 1
            continue
        out.append(byte)
        code += 1
        # A full block of 254 data bytes ends without a zero. A new block starts only if more
        # data follows, which keeps the encoding canonical.
        if code == 0xFF and index < last:
            out[code_index] = code
            code_index = len(out)
            out.append(0)
            code = 1
    out[code_index] = code
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Decode one COBS block (without delimiters); raise FrameError(BAD_FRAME) when invalid."""
    out = bytearray()
    index = 0
    size = len(data)
    while index < size:
        code = data[index]
        if code == 0:
            raise FrameError(BAD_FRAME, "zero byte inside a COBS block")
        end = index + code
        if end > size:
            raise FrameError(BAD_FRAME, "COBS code runs past the end of the frame")
        chunk = data[index + 1 : end]
        if 0 in chunk:
            raise FrameError(BAD_FRAME, "zero byte inside a COBS block")
        out.extend(chunk)
        index = end
        if code < 0xFF and index < size:
            out.append(0)
    return bytes(out)


class FrameError(Exception):
    """A frame that cannot be used, with the status code that reports it.

    ``seq`` and ``kind`` are set when the frame passed its CRC check, so a reply can name them.
    ``size`` is the number of bytes the frame had on the wire.
    """

    def __init__(self, status: int, message: str, seq: int = -1, kind: int = -1, size: int = 0):
        super().__init__(message)
        self.status = status
        self.message = message
        self.seq = seq
        self.kind = kind
        self.size = size


class Frame:
    """One decoded frame: a request (``status`` 0) or a reply (``kind`` has REPLY_BIT)."""

    def __init__(self, seq: int, kind: int, status: int, payload: bytes, version: int = 1):
        self.version = version
        self.seq = seq
        self.kind = kind
        self.status = status
        self.payload = payload

    def __repr__(self) -> str:
        return "Frame(seq=%d, kind=0x%02X, status=0x%02X, payload=%d bytes)" % (
            self.seq,
            self.kind,
            self.status,
            len(self.payload),
        )


def encode_body(seq: int, kind: int, status: int, payload: bytes, version: int = -1) -> bytes:
    """Build the unencoded body plus CRC, without checking the payload size."""
    if version < 0:
        version = PROTOCOL_VERSION
    return encode_body_with_length(seq, kind, status, payload, len(payload), version)


def encode_body_with_length(
    seq: int, kind: int, status: int, payload: bytes, length: int, version: int
) -> bytes:
    """Build a body whose length field is ``length``; only tests pass a length that differs."""
    body = bytearray((version & 0xFF, seq & 0xFF, kind & 0xFF, status & 0xFF))
    body.extend(length.to_bytes(2, "big"))
    body.extend(payload)
    body.extend(crc16(body).to_bytes(2, "big"))
    return bytes(body)


def wrap(body: bytes) -> bytes:
    """COBS-encode a body and surround it with delimiters, ready for the wire."""
    return b"\x00" + cobs_encode(body) + b"\x00"


def encode_frame(seq: int, kind: int, status: int, payload: bytes) -> bytes:
    """Build the wire bytes of one frame; raise ValueError when the payload is too long."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes exceeds the maximum %d" % (len(payload), MAX_PAYLOAD))
    return wrap(encode_body(seq, kind, status, payload))


def decode_body(encoded: bytes) -> Frame:
    """Decode the bytes between two delimiters into a Frame, or raise FrameError.

    The checks run in wire order: COBS, minimum size, CRC, then (with seq and kind known)
    version and length field.
    """
    size = len(encoded)
    if size > MAX_ENCODED:
        raise FrameError(
            FRAME_TOO_LONG,
            "frame of %d bytes exceeds the maximum %d" % (size, MAX_ENCODED),
            size=size,
        )
    try:
        body = cobs_decode(encoded)
    except FrameError as exc:
        exc.size = size
        raise
    if len(body) < HEADER_SIZE + CRC_SIZE:
        raise FrameError(
            BAD_FRAME,
            "frame of %d bytes is shorter than the %d-byte minimum"
            % (len(body), HEADER_SIZE + CRC_SIZE),
            size=size,
        )

    expected = crc16(body[:-CRC_SIZE])
    received = int.from_bytes(body[-CRC_SIZE:], "big")
    if expected != received:
        raise FrameError(
            BAD_CRC,
            "CRC 0x%04X does not match the computed 0x%04X" % (received, expected),
            size=size,
        )

    version, seq, kind, status = body[0], body[1], body[2], body[3]
    if version != PROTOCOL_VERSION:
        raise FrameError(
            UNSUPPORTED_VERSION,
            "protocol version %d is not supported; this side speaks version %d"
            % (version, PROTOCOL_VERSION),
            seq,
            kind,
            size,
        )
    length = int.from_bytes(body[4:6], "big")
    payload = body[HEADER_SIZE:-CRC_SIZE]
    if length > MAX_PAYLOAD:
        raise FrameError(
            BAD_LENGTH,
            "length field %d exceeds the maximum payload %d" % (length, MAX_PAYLOAD),
            seq,
            kind,
            size,
        )
    if length != len(payload):
        raise FrameError(
            BAD_LENGTH,
            "length field %d does not match the %d payload bytes received" % (length, len(payload)),
            seq,
            kind,
            size,
        )
    return Frame(seq, kind, status, payload, version)


class FrameReader:
    """Split a byte stream into frames; the same parser runs on the board and on the host.

    ``feed`` returns a list whose items are Frame objects or FrameError objects (returned, not
    raised, so one bad frame never hides the good ones after it). Resynchronisation is built into
    the framing: every frame ends at the next zero byte, so garbage costs at most the frame it
    lands in. Bytes beyond MAX_ENCODED are dropped until the next delimiter.
    """

    def __init__(self, gap_timeout_ms: int = FRAME_GAP_TIMEOUT_MS):
        self.gap_timeout_ms = gap_timeout_ms
        self._buffer = bytearray()
        self._overflow = 0
        self._last_byte_ms = 0

    def pending(self) -> int:
        """Return the number of bytes of the partial frame received so far."""
        return len(self._buffer) + self._overflow

    def reset(self) -> None:
        """Drop the partial frame."""
        self._buffer = bytearray()
        self._overflow = 0

    def feed(self, data: bytes, now_ms: int) -> list[Frame | FrameError]:
        """Consume ``data`` read at ``now_ms`` (any monotonic milliseconds).

        feed() never drops a partial frame for its age. ``now_ms`` is when the bytes were read,
        which is later than when they arrived if the reader was descheduled, so only a reader
        that found no new bytes calls expire().
        """
        events: list[Frame | FrameError] = []
        if data:
            self._last_byte_ms = now_ms

        data = bytes(data)
        start = 0
        size = len(data)
        while start < size:
            end = data.find(b"\x00", start)
            if end < 0:
                self._append(data[start:])
                break
            self._append(data[start:end])
            event = self._finish()
            if event is not None:
                events.append(event)
            start = end + 1
        return events

    def expire(self, now_ms: int) -> FrameError | None:
        """Drop a partial frame that got no byte for ``gap_timeout_ms``; return its error."""
        if not self.pending():
            return None
        if now_ms - self._last_byte_ms < self.gap_timeout_ms:
            return None
        size = self.pending()
        self.reset()
        return FrameError(
            FRAME_TIMEOUT,
            "partial frame of %d bytes got no further byte for %d ms and was dropped"
            % (size, self.gap_timeout_ms),
            size=size,
        )

    def _append(self, chunk: bytes) -> None:
        room = MAX_ENCODED + 1 - len(self._buffer)
        if self._overflow or len(chunk) > room:
            kept = max(0, min(room, len(chunk)))
            self._buffer.extend(chunk[:kept])
            self._overflow += len(chunk) - kept
            return
        self._buffer.extend(chunk)

    def _finish(self) -> Frame | FrameError | None:
        encoded = bytes(self._buffer)
        overflow = self._overflow
        self.reset()
        if overflow:
            size = len(encoded) + overflow
            return FrameError(
                FRAME_TOO_LONG,
                "frame of %d bytes exceeds the maximum %d" % (size, MAX_ENCODED),
                size=size,
            )
        if not encoded:
            return None
        try:
            return decode_body(encoded)
        except FrameError as exc:
            return exc
