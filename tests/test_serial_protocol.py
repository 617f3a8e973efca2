"""The firmware link protocol: published vectors, frame parser properties, MicroPython imports."""

from __future__ import annotations

import ast
import tempfile
import time
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_sdk.errors import SerialLinkError
from device_sdk.keys.serial_link import SerialLink
from firmware_shim import atecc608, protocol
from firmware_shim.device import Device, SecureElementError
from firmware_shim.software_se import SoftwareSecureElement

FIRMWARE_DIR = Path(protocol.__file__).resolve().parent
BOARD_FILES = {"__init__.py", "protocol.py", "device.py", "atecc608.py", "main.py"}
HOST_ONLY_FILES = {"software_se.py", "simulator.py"}
BOARD_MODULES = {"firmware_shim"} | {
    f"firmware_shim.{name.removesuffix('.py')}" for name in BOARD_FILES - {"__init__.py"}
}
# Modules in MicroPython's standard builds (the "u" names are the older spellings).
MICROPYTHON_MODULES = {
    "array", "binascii", "ubinascii", "collections", "ucollections", "errno", "uerrno", "gc",
    "hashlib", "uhashlib", "io", "uio", "json", "ujson", "machine", "math", "micropython", "os",
    "uos", "random", "urandom", "re", "ure", "select", "uselect", "struct", "ustruct", "sys",
    "usys", "time", "utime", "uctypes", "asyncio", "uasyncio", "heapq", "uheapq", "zlib",
}  # fmt: skip

SETTINGS = settings(
    max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# --- vectors -----------------------------------------------------------------------------------


def test_crc16_check_value() -> None:
    # CRC-16/CCITT-FALSE check value from the CRC RevEng catalogue.
    assert protocol.crc16(b"123456789") == 0x29B1


COBS_VECTORS = [
    # Examples from the COBS article (Cheshire and Baker, 1999) as listed on Wikipedia.
    ("00", "0101"),
    ("0000", "010101"),
    ("001100", "01021101"),
    ("11220033", "0311220233"),
    ("11223344", "0511223344"),
    ("11000000", "0211010101"),
    (bytes(range(1, 255)).hex(), "ff" + bytes(range(1, 255)).hex()),
    (bytes(range(0, 255)).hex(), "01ff" + bytes(range(1, 255)).hex()),
    (bytes(range(1, 256)).hex(), "ff" + bytes(range(1, 255)).hex() + "02ff"),
    (bytes(range(2, 256)).hex() + "00", "ff" + bytes(range(2, 256)).hex() + "0101"),
    (bytes(range(3, 256)).hex() + "0001", "fe" + bytes(range(3, 256)).hex() + "0201"),
]


@pytest.mark.parametrize(("plain", "encoded"), COBS_VECTORS)
def test_cobs_vectors(plain: str, encoded: str) -> None:
    assert protocol.cobs_encode(bytes.fromhex(plain)).hex() == encoded
    assert protocol.cobs_decode(bytes.fromhex(encoded)).hex() == plain


def test_atecc_wake_reply_crc() -> None:
    # The wake reply 04 11 33 43 carries the CRC of its first two bytes.
    assert atecc608.atecc_crc(b"\x04\x11") == b"\x33\x43"


def test_atecc_info_packet() -> None:
    # The Info (revision) command as it appears on the bus in Microchip's examples.
    assert atecc608.build_packet(atecc608.OP_INFO, 0, 0).hex() == "0730000000035d"


def test_atecc_reply_status_error() -> None:
    reply = b"\x04\x0f" + atecc608.atecc_crc(b"\x04\x0f")

    with pytest.raises(SecureElementError, match="ATECC608 status 0x0F: execution error") as caught:
        atecc608.check_reply(reply)
    assert caught.value.status == protocol.SE_FAILURE
    assert caught.value.detail == 0x0F


def test_frame_layout() -> None:
    wire = protocol.encode_frame(5, protocol.SIGN_DIGEST, 0, b"\x00\x01")

    body = protocol.cobs_decode(wire[1:-1])

    assert wire[0] == 0
    assert wire[-1] == 0
    assert body[:6] == bytes((1, 5, protocol.SIGN_DIGEST, 0, 0, 2))
    assert body[6:8] == b"\x00\x01"
    assert body[8:] == protocol.crc16(body[:8]).to_bytes(2, "big")


def test_payload_too_long_rejected() -> None:
    with pytest.raises(ValueError, match="payload of 241 bytes exceeds the maximum 240"):
        protocol.encode_frame(1, protocol.HELLO, 0, bytes(241))


# --- parser properties -------------------------------------------------------------------------

frames = st.builds(
    protocol.Frame,
    seq=st.integers(0, 255),
    kind=st.integers(0, 255),
    status=st.integers(0, 255),
    payload=st.binary(max_size=protocol.MAX_PAYLOAD),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces, start = [], 0
    for point in points + [len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


@SETTINGS
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_reader_any_bytes_no_crash(data: bytes, cuts: list[int]) -> None:
    reader = protocol.FrameReader()
    events = []
    for now, piece in enumerate(split(data, cuts)):
        events += reader.feed(piece, now)

    assert all(isinstance(event, protocol.Frame | protocol.FrameError) for event in events)
    assert reader.pending() <= len(data)
    assert len(events) <= data.count(0) + 1


@SETTINGS
@given(garbage=st.binary(max_size=600), frame=frames, cuts=st.lists(st.integers(0, 900)))
def test_reader_resyncs_after_garbage(
    garbage: bytes, frame: protocol.Frame, cuts: list[int]
) -> None:
    wire = protocol.encode_frame(frame.seq, frame.kind, frame.status, frame.payload)
    reader = protocol.FrameReader()
    events = []
    for piece in split(garbage + wire, cuts):
        events += reader.feed(piece, 0)

    last = events[-1]
    assert isinstance(last, protocol.Frame)
    assert (last.seq, last.kind, last.status, last.payload) == (
        frame.seq,
        frame.kind,
        frame.status,
        frame.payload,
    )
    assert reader.pending() == 0


@SETTINGS
@given(data=st.binary(max_size=400))
def test_decode_body_raises_only_frame_error(data: bytes) -> None:
    try:
        frame = protocol.decode_body(data)
    except protocol.FrameError as exc:
        assert exc.status in protocol.STATUS_NAMES
    else:
        assert len(frame.payload) <= protocol.MAX_PAYLOAD


@SETTINGS
@given(plain=st.binary(max_size=1200))
def test_cobs_round_trip(plain: bytes) -> None:
    encoded = protocol.cobs_encode(plain)

    assert 0 not in encoded
    assert len(encoded) <= len(plain) + len(plain) // 254 + 1
    assert protocol.cobs_decode(encoded) == plain


@pytest.fixture(scope="module")
def device() -> Device:
    directory = tempfile.TemporaryDirectory()
    element = SoftwareSecureElement(Path(directory.name))
    element.generate(0)
    device = Device(element)
    device._directory = directory  # type: ignore[attr-defined]
    return device


@SETTINGS
@given(data=st.binary(max_size=1500), cuts=st.lists(st.integers(0, 1500), max_size=10))
def test_device_answers_any_bytes(device: Device, data: bytes, cuts: list[int]) -> None:
    """The firmware side of the link: any input gives only well-formed replies."""
    device.reader.reset()
    replies = []
    for now, piece in enumerate(split(data, cuts)):
        replies += device.receive(piece, now * 10)
    replies += device.poll(10_000_000)

    for reply in replies:
        assert reply[0] == 0
        assert reply[-1] == 0
        frame = protocol.decode_body(reply[1:-1])
        assert frame.kind & protocol.REPLY_BIT
        assert frame.status in protocol.STATUS_NAMES


@SETTINGS
@given(
    kind=st.sampled_from(sorted(protocol.COMMAND_NAMES) + [0x00, 0x55, 0xFF]),
    payload=st.binary(max_size=protocol.MAX_PAYLOAD),
)
def test_device_any_request_answered(device: Device, kind: int, payload: bytes) -> None:
    device.reader.reset()
    if kind == protocol.GENERATE_KEY:
        payload = payload[:1] + b"\x01\x00" + payload[3:]
    replies = device.receive(protocol.encode_frame(9, kind, 0, payload), 0)

    assert len(replies) == 1
    frame = protocol.decode_body(replies[0][1:-1])
    assert frame.seq == 9
    assert frame.kind == kind | protocol.REPLY_BIT
    assert frame.status in protocol.STATUS_NAMES


class ScriptedPort:
    """A fake serial port: replies to HELLO properly, then sends scripted bytes for any request."""

    def __init__(self, script: bytes, device: Device, chunk_size: int = 4096) -> None:
        self.timeout: float | None = 0
        self.script = script
        self.chunk_size = chunk_size
        self.device = device
        self.reader = protocol.FrameReader()
        self.queue: deque[bytes] = deque()

    @property
    def in_waiting(self) -> int:
        return sum(len(chunk) for chunk in self.queue)

    def read(self, size: int = 1) -> bytes:
        if not self.queue:
            # Nothing more will come: let the caller's deadline run out without a busy loop.
            time.sleep(min(self.timeout or 0, 0.005))
            return b""
        size = min(size, self.chunk_size)
        chunk = self.queue.popleft()
        if len(chunk) > size:
            self.queue.appendleft(chunk[size:])
            chunk = chunk[:size]
        return chunk

    def write(self, data: bytes) -> int:
        for event in self.reader.feed(data, 0):
            assert isinstance(event, protocol.Frame)
            if event.kind == protocol.HELLO:
                self.queue.extend(self.device.receive(protocol.wrap(_body(event)), 0))
            else:
                self.queue.append(self.script)
        return len(data)

    def reset_input_buffer(self) -> None:
        self.queue.clear()

    def close(self) -> None:
        pass


def _body(frame: protocol.Frame) -> bytes:
    return protocol.encode_body(frame.seq, frame.kind, frame.status, frame.payload)


# No per-example deadline: each example writes a state file with fsync, which a loaded machine
# can slow down. The elapsed-time check below is what catches a hang.
@settings(max_examples=150, deadline=None)
@given(
    garbage=st.binary(max_size=400),
    reply_status=st.integers(0, 255),
    reply_payload=st.binary(max_size=20),
    append_reply=st.booleans(),
    chunk_size=st.integers(1, 64),
)
def test_host_any_reply_no_crash(
    garbage: bytes, reply_status: int, reply_payload: bytes, append_reply: bool, chunk_size: int
) -> None:
    """The host side of the link: any bytes give a result or a SerialLinkError, in time."""
    element_dir = tempfile.TemporaryDirectory()
    device = Device(SoftwareSecureElement(Path(element_dir.name)))
    script = garbage
    if append_reply:
        # The host's second request (after the HELLO probe) has seq 2.
        script += protocol.encode_frame(
            2, protocol.COUNTER | protocol.REPLY_BIT, reply_status, reply_payload
        )
    link = SerialLink(
        "/dev/fake", timeout=0.05, port_factory=lambda: ScriptedPort(script, device, chunk_size)
    )

    started = time.monotonic()
    try:
        reply = link.request(protocol.COUNTER, b"\x00\x00")
    except SerialLinkError:
        pass
    else:
        assert isinstance(reply, bytes)
    finally:
        element_dir.cleanup()

    assert time.monotonic() - started < 10.0


# --- MicroPython import check ------------------------------------------------------------------


def test_every_firmware_file_classified() -> None:
    present = {path.name for path in FIRMWARE_DIR.glob("*.py")}

    assert present == BOARD_FILES | HOST_ONLY_FILES


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import on line {node.lineno}"
            module = node.module or ""
            if module == "firmware_shim":
                found += [(f"firmware_shim.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((module, node.lineno))
    return found


@pytest.mark.parametrize("name", sorted(BOARD_FILES))
def test_board_file_micropython_imports(name: str) -> None:
    tree = ast.parse((FIRMWARE_DIR / name).read_text(), name)

    for module, line in _imports(tree):
        top = module.split(".")[0]
        allowed = module in BOARD_MODULES or (top == module and top in MICROPYTHON_MODULES)
        assert allowed, f"{name}:{line} imports {module}, which MicroPython does not have"


@pytest.mark.parametrize("name", sorted(BOARD_FILES))
def test_board_file_micropython_syntax(name: str) -> None:
    """Reject constructs that MicroPython lacks or that older releases lack."""
    tree = ast.parse((FIRMWARE_DIR / name).read_text(), name)

    for node in ast.walk(tree):
        line = getattr(node, "lineno", "?")
        assert not isinstance(node, ast.Match), f"{name}:{line}: match statement"
        assert not isinstance(node, ast.JoinedStr), f"{name}:{line}: f-string (MicroPython < 1.17)"
        assert not isinstance(node, ast.AsyncFunctionDef), f"{name}:{line}: async def"
        if isinstance(node, ast.Attribute):
            assert node.attr not in {"hex", "fromhex"}, f"{name}:{line}: bytes.{node.attr}"


class FailingElement(SoftwareSecureElement):
    """A software element whose I2C bus fails on the first signature."""

    def sign(self, slot: int, digest: bytes) -> bytes:
        raise OSError(5, "I2C bus error")


def test_device_reports_internal_error(tmp_path: Path) -> None:
    element = FailingElement(tmp_path)
    element.generate(0)
    device = Device(element)

    (failed,) = device.receive(
        protocol.encode_frame(3, protocol.SIGN_DIGEST, 0, b"\x00" + bytes(32)), 0
    )
    (hello,) = device.receive(protocol.encode_frame(4, protocol.HELLO, 0, b""), 1)

    frame = protocol.decode_body(failed[1:-1])
    assert frame.seq == 3
    assert frame.status == protocol.INTERNAL_ERROR
    assert frame.payload[1:] == b"OSError: [Errno 5] I2C bus error"
    assert protocol.decode_body(hello[1:-1]).status == protocol.OK


@pytest.mark.parametrize("chunk_size", [1, 3, 17])
def test_host_joins_partial_reads(chunk_size: int, tmp_path: Path) -> None:
    device = Device(SoftwareSecureElement(tmp_path))
    reply = protocol.encode_frame(2, protocol.COUNTER | protocol.REPLY_BIT, 0, b"\x00\x00\x01\x02")
    link = SerialLink(
        "/dev/fake", timeout=1.0, port_factory=lambda: ScriptedPort(reply, device, chunk_size)
    )

    assert link.request(protocol.COUNTER, b"\x00\x00") == b"\x00\x00\x01\x02"
