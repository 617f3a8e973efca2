"""The host end of the secure-element link: frames over pyserial, one command at a time.

:class:`SerialLink` owns the port. It sends a request, joins partial reads until a frame is
complete, skips garbage and frames that fail their checks, and matches the reply by sequence
number. Frame parsing is :mod:`firmware_shim.protocol`, the code the firmware itself runs.

Opening the port: Linux raises DTR and RTS whenever a serial device is opened, and boards such as
Arduinos reset on that edge. The link leaves both lines asserted (no further edge from pyserial)
and clears HUPCL, so closing the port does not drop DTR and later opens cause no reset. The first
open after the board powers up can still reset it; the readiness probe covers that case.

Readiness: after opening, the link sends HELLO until the device replies or ``connect_timeout``
passes, instead of waiting for a greeting that a running board would never send.

Reconnect: an I/O error on the port (the device unplugged, the simulator restarted) closes it.
The next command opens the path again, which may be a symbolic link that now points elsewhere.
A signing key's commands first check that its slot still holds the same public key. A command
that changes state (GENERATE_KEY, LOCK_SLOT, a counter increment) is not repeated after the link
was lost while waiting for its reply, because it may already have run.
"""

from __future__ import annotations

import logging
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from device_sdk.errors import SerialDeviceError, SerialLinkError, SerialTimeoutError
from firmware_shim import protocol

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DEFAULT_TIMEOUT", "DeviceInfo", "Port", "SerialLink"]

# Seconds to wait for a reply. An ATECC608 needs at most 115 ms for its slowest command
# (GenKey), so this leaves room for slow links and a busy host.
DEFAULT_TIMEOUT = 2.0
# Seconds to find the device again and get a reply to HELLO, after a start or a reset.
DEFAULT_CONNECT_TIMEOUT = 5.0
# Seconds per HELLO try while probing, so a frame lost during a board's start is sent again.
PROBE_TRY_TIMEOUT = 0.3
MAX_OPEN_RETRY_DELAY = 0.25


class Port(Protocol):
    """The serial port interface that the link uses; ``serial.Serial`` implements it."""

    timeout: float | None

    @property
    def in_waiting(self) -> int: ...

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes) -> int | None: ...

    def reset_input_buffer(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DeviceInfo:
    """The firmware's HELLO reply."""

    protocol_version: int
    firmware_version: str
    capabilities: int
    slot_count: int
    element: str
    serial_number: str
    max_payload: int

    @property
    def hardware_backed(self) -> bool:
        """True when the keys live in a hardware secure element, False for the simulator's."""
        return self.element == protocol.SE_KIND_NAMES[protocol.SE_ATECC608]

    @classmethod
    def parse(cls, payload: bytes, device: str) -> DeviceInfo:
        try:
            serial_length = payload[8]
            serial = payload[9 : 9 + serial_length]
            max_payload = int.from_bytes(payload[9 + serial_length : 11 + serial_length], "big")
            if len(serial) != serial_length or len(payload) != 11 + serial_length:
                raise IndexError
        except IndexError:
            raise SerialLinkError(
                f"the HELLO reply from {device} is malformed ({len(payload)} bytes): the firmware "
                "does not speak link protocol version 1"
            ) from None
        kind = payload[7]
        return cls(
            protocol_version=payload[0],
            firmware_version=".".join(str(part) for part in payload[1:4]),
            capabilities=int.from_bytes(payload[4:6], "big"),
            slot_count=payload[6],
            element=protocol.SE_KIND_NAMES.get(kind, f"unknown ({kind})"),
            serial_number=serial.hex(),
            max_payload=max_payload,
        )


class _Disconnected(Exception):
    """The port failed with an I/O error: the device is gone, at least for now.

    ``sent`` is False when the failure came before the whole request was written, so the device
    cannot have run it.
    """

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


def open_pyserial(device: str, baud: int, write_timeout: float) -> Port:
    """Open ``device`` with pyserial: 8N1, no flow control, DTR and RTS as the kernel set them.

    The port is locked with flock(), so a second process gets an error instead of a share.
    """
    import serial

    port = serial.Serial()
    port.port = device
    port.baudrate = baud
    port.bytesize = serial.EIGHTBITS
    port.parity = serial.PARITY_NONE
    port.stopbits = serial.STOPBITS_ONE
    port.xonxoff = False
    port.rtscts = False
    port.dsrdtr = False
    port.timeout = 0
    port.write_timeout = write_timeout
    # flock() the port: frames from two processes on one link would corrupt each other.
    port.exclusive = True
    port.open()

    try:
        attributes = termios.tcgetattr(port.fd)
        attributes[2] &= ~termios.HUPCL
        termios.tcsetattr(port.fd, termios.TCSANOW, attributes)
    except termios.error as exc:
        logger.debug("could not clear HUPCL on %s: %s", device, exc)
    return port  # type: ignore[no-any-return]


class SerialLink:
    """One serial secure element. Commands from several threads run one at a time."""

    def __init__(
        self,
        device: str,
        baud: int = 115200,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        port_factory: Callable[[], Port] | None = None,
    ) -> None:
        self.device = device
        self.baud = baud
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._port_factory = port_factory or (lambda: open_pyserial(device, baud, timeout))
        self._lock = threading.Lock()
        self._port: Port | None = None
        self._reader = protocol.FrameReader()
        self._seq = 0
        self._info: DeviceInfo | None = None
        self._seen_keys: dict[int, tuple[bytes, int]] = {}
        self.connections = 0

    @property
    def info(self) -> DeviceInfo:
        """The device's HELLO reply, connecting first if needed."""
        with self._lock:
            self._ensure_open()
            assert self._info is not None
            return self._info

    def key_seen(self, slot: int, public_key: bytes) -> None:
        """Record that ``slot`` contains ``public_key`` (X || Y) on the current connection."""
        with self._lock:
            self._seen_keys[slot] = (public_key, self.connections)

    def request(
        self,
        command: int,
        payload: bytes = b"",
        *,
        timeout: float | None = None,
        repeatable: bool = True,
        expected_key: tuple[int, bytes] | None = None,
    ) -> bytes:
        """Send one command and return the payload of its OK reply.

        Raises SerialDeviceError for an error status, SerialTimeoutError when no valid reply
        arrives in ``timeout`` seconds, and SerialLinkError when the link is lost. After a lost
        link a ``repeatable`` command, or one that was not completely written, is sent once more
        on the reopened port. With ``expected_key`` (slot, X || Y), the command is sent only
        while that slot contains that key, checked again after every reconnect.
        """
        with self._lock:
            self._ensure_open()
            try:
                return self._checked_exchange(command, payload, timeout, expected_key)
            except _Disconnected as exc:
                self._close_port()
                if exc.sent and not repeatable:
                    raise SerialLinkError(
                        f"lost the link to {self.device} during {protocol.command_name(command)} "
                        f"({exc}); the command may have run. The next command reconnects"
                    ) from exc
                logger.warning(
                    "lost the link to %s during %s (%s); reconnecting",
                    self.device,
                    protocol.command_name(command),
                    exc,
                )
            self._ensure_open()
            try:
                return self._checked_exchange(command, payload, timeout, expected_key)
            except _Disconnected as exc:
                self._close_port()
                raise SerialLinkError(
                    f"lost the link to {self.device} again right after reconnecting ({exc}); "
                    "check the cable and the device's power"
                ) from exc

    def close(self) -> None:
        with self._lock:
            self._close_port()

    def _checked_exchange(
        self,
        command: int,
        payload: bytes,
        timeout: float | None,
        expected_key: tuple[int, bytes] | None,
    ) -> bytes:
        try:
            self._check_key(expected_key)
        except _Disconnected as exc:
            # Only the key check was on the wire, so the command itself never ran.
            raise _Disconnected(str(exc), sent=False) from exc
        return self._exchange(command, payload, timeout or self.timeout)

    # --- raw access, for tests of the framing ------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        """Write bytes to the port as they are, outside any frame."""
        with self._lock:
            port = self._ensure_open()
            try:
                port.write(data)
            except _port_errors() as exc:
                self._close_port()
                raise SerialLinkError(f"writing to {self.device} failed: {exc}") from exc

    def read_events(self, timeout: float) -> list[protocol.Frame | protocol.FrameError]:
        """Read until at least one frame or frame error arrives, or ``timeout`` passes."""
        with self._lock:
            port = self._ensure_open()
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                events = self._feed(self._read(port, remaining))
                if events:
                    return events

    # --- internals -----------------------------------------------------------------------------

    def _next_seq(self) -> int:
        # Sequence numbers run 1 to 255; 0 marks the device's reports of unreadable frames.
        self._seq = self._seq % 255 + 1
        return self._seq

    def _ensure_open(self) -> Port:
        if self._port is not None:
            return self._port
        deadline = time.monotonic() + self.connect_timeout
        port = self._open_until(deadline)
        self._port = port
        self._reader.reset()
        try:
            self._info = self._probe(deadline)
        except _Disconnected as exc:
            self._close_port()
            raise SerialLinkError(
                f"the link to {self.device} failed while connecting: {exc}"
            ) from exc
        except SerialLinkError:
            self._close_port()
            raise
        self.connections += 1
        logger.info(
            "connected to %s: firmware %s, %s secure element %s, %d slots",
            self.device,
            self._info.firmware_version,
            self._info.element,
            self._info.serial_number,
            self._info.slot_count,
        )
        return port

    def _open_until(self, deadline: float) -> Port:
        delay = 0.02
        while True:
            try:
                return self._port_factory()
            except _port_errors() as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SerialLinkError(
                        f"cannot open serial device {self.device} within "
                        f"{self.connect_timeout:g} s: {exc}. Check the path (a stable "
                        "/dev/serial/by-id/ link, or the simulator's --link), the cable, that "
                        "this user may open the device (group dialout), and that no other "
                        "process has it open"
                    ) from exc
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, MAX_OPEN_RETRY_DELAY)

    def _probe(self, deadline: float) -> DeviceInfo:
        """Send HELLO until the device replies or the deadline passes."""
        tries = 0
        while True:
            tries += 1
            remaining = deadline - time.monotonic()
            try:
                payload = self._exchange(
                    protocol.HELLO, b"", max(0.01, min(PROBE_TRY_TIMEOUT, remaining))
                )
            except SerialTimeoutError as exc:
                if time.monotonic() < deadline:
                    continue
                raise SerialTimeoutError(
                    f"{self.device} opened, but the device replied to none of {tries} HELLO "
                    f"requests within {self.connect_timeout:g} s ({exc.bytes_received} bytes "
                    "arrived for the last one). Check that the firmware runs and that the baud "
                    f"rate {self.baud} matches",
                    bytes_received=exc.bytes_received,
                ) from exc
            return DeviceInfo.parse(payload, self.device)

    def _check_key(self, expected_key: tuple[int, bytes] | None) -> None:
        """Check, once per connection, that a slot still contains the key that was opened."""
        if expected_key is None:
            return
        slot, expected = expected_key
        if self._seen_keys.get(slot) == (expected, self.connections):
            return
        try:
            reply = self._exchange(protocol.GET_PUBLIC_KEY, bytes((slot,)), self.timeout)
            current = reply[1:]
        except SerialDeviceError as exc:
            if exc.status != protocol.SLOT_EMPTY:
                raise
            current = b""
        if current != expected:
            raise SerialLinkError(
                f"slot {slot} of the device at {self.device} contains a different key than "
                f"when it was opened ({'now empty' if not current else 'another public key'}): "
                "another device may be on that port. Open the key again to use what it holds"
            )
        self._seen_keys[slot] = (expected, self.connections)

    def _close_port(self) -> None:
        port, self._port = self._port, None
        self._reader.reset()
        if port is not None:
            try:
                port.close()
            except _port_errors() as exc:
                logger.debug("closing %s failed: %s", self.device, exc)

    def _read(self, port: Port, remaining: float) -> bytes:
        try:
            port.timeout = remaining
            return port.read(max(1, port.in_waiting))
        except _port_errors() as exc:
            raise _Disconnected(str(exc), sent=True) from exc

    def _feed(self, chunk: bytes) -> list[protocol.Frame | protocol.FrameError]:
        """Parse a chunk; after a read that found nothing, drop a partial frame gone quiet."""
        now = _monotonic_ms()
        if chunk:
            return self._reader.feed(chunk, now)
        expired = self._reader.expire(now)
        return [] if expired is None else [expired]

    def _exchange(self, command: int, payload: bytes, timeout: float) -> bytes:
        """Send one request and wait for its reply; the lock is held and the port open."""
        port = self._port
        assert port is not None
        seq = self._next_seq()
        name = protocol.command_name(command)
        wire = protocol.encode_frame(seq, command, protocol.OK, payload)

        # Bytes still queued belong to earlier requests that timed out.
        try:
            port.reset_input_buffer()
            self._reader.reset()
            port.write(wire)
        except _port_errors() as exc:
            raise _Disconnected(str(exc), sent=False) from exc

        deadline = time.monotonic() + timeout
        received = 0
        discarded: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(name, seq, timeout, received, discarded)
            chunk = self._read(port, remaining)
            received += len(chunk)
            for event in self._feed(chunk):
                reply = self._match(event, command, seq, discarded)
                if reply is not None:
                    return reply

    def _match(
        self,
        event: protocol.Frame | protocol.FrameError,
        command: int,
        seq: int,
        discarded: list[str],
    ) -> bytes | None:
        """Return the payload when ``event`` is the OK reply; raise for an error reply."""
        name = protocol.command_name(command)
        if isinstance(event, protocol.FrameError):
            if event.seq == seq:
                # The frame passed its CRC check and carries our seq, so it is our reply, broken.
                raise SerialLinkError(
                    f"the reply to {name} from {self.device} is malformed: "
                    f"{protocol.status_name(event.status)}: {event.message}"
                )
            note = f"{protocol.status_name(event.status)} ({event.size} bytes): {event.message}"
            discarded.append(note)
            logger.warning("discarded a frame from %s: %s", self.device, note)
            return None

        if event.seq == protocol.FRAME_ERROR_SEQ and event.kind == protocol.FRAME_ERROR_KIND:
            note = (
                f"the device reported {protocol.status_name(event.status)} for a frame it "
                f"could not read: {_error_message(event.payload)}"
            )
            discarded.append(note)
            logger.warning("%s: %s", self.device, note)
            return None
        if event.seq != seq:
            logger.debug("skipped a stale reply with seq %d from %s", event.seq, self.device)
            return None
        if event.kind != command | protocol.REPLY_BIT:
            raise SerialLinkError(
                f"the reply from {self.device} with seq {seq} is for command "
                f"0x{event.kind & 0x7F:02X}, but {name} (0x{command:02X}) was sent"
            )
        if event.status == protocol.OK:
            return event.payload
        raise self._device_error(name, event)

    def _device_error(self, name: str, frame: protocol.Frame) -> SerialDeviceError:
        status_name = protocol.status_name(frame.status)
        detail = frame.payload[0] if frame.payload else 0
        message = _error_message(frame.payload)
        if frame.status not in protocol.STATUS_NAMES:
            text = (
                f"{name} on {self.device}: the device returned unknown status "
                f"0x{frame.status:02X}; the firmware may be newer than this SDK"
            )
        else:
            text = f"{name} on {self.device}: {status_name} (0x{frame.status:02X})"
            if message:
                text += f": {message}"
            if detail:
                text += f" (secure element status 0x{detail:02X})"
        return SerialDeviceError(text, status=frame.status, status_name=status_name, detail=detail)

    def _timeout(
        self, name: str, seq: int, timeout: float, received: int, discarded: list[str]
    ) -> SerialTimeoutError:
        text = (
            f"no reply to {name} (seq {seq}) from {self.device} within {timeout:g} s: "
            f"{received} bytes arrived"
        )
        pending = self._reader.pending()
        if pending:
            text += f", {pending} of them in an unfinished frame"
        if discarded:
            count = f"{len(discarded)} invalid frame" + ("s" if len(discarded) > 1 else "")
            text += f"; discarded {count}: " + "; ".join(discarded[:3])
        elif not received:
            text += "; check that the device is powered and runs the firmware"
        return SerialTimeoutError(text, bytes_received=received)


def _error_message(payload: bytes) -> str:
    return payload[1:].decode("utf-8", "replace")


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _port_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean the port failed: pyserial's, and termios.error, which is no OSError."""
    try:
        import serial
    except ModuleNotFoundError:
        return (OSError, termios.error)
    return (OSError, termios.error, serial.SerialException)
