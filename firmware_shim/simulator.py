"""Serve the firmware protocol on a pseudo-terminal, with a software secure element.

    python -m firmware_shim.simulator --state-dir DIR [--link PATH] [--slots N]
                                      [--allow-fault-injection]

The simulator opens a pseudo-terminal in raw mode, prints the path of its terminal side (for
example ``/dev/pts/7``) as the first line on stdout, and serves until SIGTERM or SIGINT. Keys,
slot locks and counters live in DIR, so a restart with the same DIR is a power cycle.

Each start gets a new pseudo-terminal path. ``--link PATH`` keeps a symbolic link at PATH that
points to the current terminal: it is replaced atomically at start and removed at a clean stop.
A host uses ``serial:PATH`` across restarts, as it would use a udev ``/dev/serial/by-id/`` link
for a board that re-enumerates after a reset.

``--allow-fault-injection`` enables the FAULT command (0x7F), which corrupts the next reply on
purpose; tests use it to check how the host handles a broken link. Without the option FAULT is
an unknown command, as on a board.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import secrets
import select
import signal
import sys
import time
import tty
from pathlib import Path
from types import FrameType

from firmware_shim import protocol
from firmware_shim.device import CAPABILITIES, Device, error_payload
from firmware_shim.software_se import DEFAULT_SLOT_COUNT, SoftwareSecureElement

logger = logging.getLogger("firmware_shim.simulator")

# FAULT payload byte: what to do to the next reply.
FAULT_GARBAGE_ONLY = 1
FAULT_GARBAGE_BEFORE = 2
FAULT_TRUNCATE = 3
FAULT_BAD_CRC = 4
FAULT_OVERSIZE_FRAME = 5
FAULT_OVERSIZE_LENGTH = 6
FAULT_UNKNOWN_STATUS = 7
FAULT_WRONG_KIND = 8
FAULT_NAMES = {
    FAULT_GARBAGE_ONLY: "garbage instead of the reply",
    FAULT_GARBAGE_BEFORE: "garbage before the reply",
    FAULT_TRUNCATE: "truncated reply",
    FAULT_BAD_CRC: "reply with a bad CRC",
    FAULT_OVERSIZE_FRAME: "frame longer than the maximum",
    FAULT_OVERSIZE_LENGTH: "reply with an oversize length field",
    FAULT_UNKNOWN_STATUS: "reply with an unknown status code",
    FAULT_WRONG_KIND: "reply to a different command",
}
UNKNOWN_STATUS_CODE = 0x9C
OVERSIZE_LENGTH_FIELD = 4000
WRITE_TIMEOUT_S = 1.0
POLL_INTERVAL_S = 0.05


def _garbage(size: int) -> bytes:
    """Random bytes without a zero byte, so they never end a frame by themselves."""
    return bytes(1 + secrets.randbelow(255) for _ in range(size))


class FaultInjectingDevice(Device):
    """The firmware's Device, plus the FAULT command when fault injection is allowed."""

    def __init__(self, element: SoftwareSecureElement, allow_faults: bool) -> None:
        capabilities = CAPABILITIES | (protocol.CAP_FAULT_INJECTION if allow_faults else 0)
        super().__init__(element, capabilities)
        self.allow_faults = allow_faults
        self._next_fault = 0

    def dispatch(self, frame: protocol.Frame) -> bytes:
        if frame.kind == protocol.FAULT and self.allow_faults:
            if len(frame.payload) != 1 or frame.payload[0] not in FAULT_NAMES:
                message = f"FAULT takes one byte, one of {sorted(FAULT_NAMES)}"
                kind = frame.kind | protocol.REPLY_BIT
                return protocol.encode_frame(
                    frame.seq, kind, protocol.BAD_ARGUMENT, error_payload(0, message)
                )
            self._next_fault = frame.payload[0]
            logger.warning("fault injection: the next reply is a %s", FAULT_NAMES[self._next_fault])
            return protocol.encode_frame(
                frame.seq, frame.kind | protocol.REPLY_BIT, protocol.OK, b""
            )

        reply = super().dispatch(frame)
        fault, self._next_fault = self._next_fault, 0
        if fault:
            return self._corrupt(fault, reply)
        return reply

    def report_internal_error(self, error: Exception) -> None:
        logger.error("command failed inside the simulator", exc_info=error)

    def _corrupt(self, fault: int, reply: bytes) -> bytes:
        body = protocol.cobs_decode(reply.strip(b"\x00"))
        seq, kind, status = body[1], body[2], body[3]
        payload = body[protocol.HEADER_SIZE : -protocol.CRC_SIZE]
        if fault == FAULT_GARBAGE_ONLY:
            return _garbage(37)
        if fault == FAULT_GARBAGE_BEFORE:
            return _garbage(37) + reply
        if fault == FAULT_TRUNCATE:
            return reply[: len(reply) // 2]
        if fault == FAULT_BAD_CRC:
            broken = body[:-1] + bytes((body[-1] ^ 0x01,))
            return protocol.wrap(broken)
        if fault == FAULT_OVERSIZE_FRAME:
            return b"\x00" + _garbage(protocol.MAX_ENCODED + 50) + b"\x00"
        if fault == FAULT_OVERSIZE_LENGTH:
            oversize = protocol.encode_body_with_length(
                seq, kind, status, payload, OVERSIZE_LENGTH_FIELD, protocol.PROTOCOL_VERSION
            )
            return protocol.wrap(oversize)
        if fault == FAULT_UNKNOWN_STATUS:
            return protocol.wrap(protocol.encode_body(seq, kind, UNKNOWN_STATUS_CODE, b""))
        if fault == FAULT_WRONG_KIND:
            other = protocol.COUNTER | protocol.REPLY_BIT
            if kind == other:
                other = protocol.HELLO | protocol.REPLY_BIT
            return protocol.wrap(protocol.encode_body(seq, other, status, payload))
        return reply


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``, waiting up to WRITE_TIMEOUT_S for room; drop the rest after that."""
    deadline = time.monotonic() + WRITE_TIMEOUT_S
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            written = 0
        view = view[written:]
        if not view:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            logger.warning("no reader drained the terminal: dropped %d reply bytes", len(view))
            return
        select.select([], [fd], [], remaining)


def _replace_link(link: Path, target: str) -> None:
    temporary = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    os.replace(temporary, link)


class Simulator:
    """One simulated board: a pseudo-terminal, a Device and a software secure element."""

    def __init__(self, device: Device, link: Path | None = None) -> None:
        self.device = device
        self.link = link
        self.stopping = False
        self.master_fd, self._terminal_fd = os.openpty()
        # The simulator keeps its own descriptor of the terminal side open and never reads it:
        # without one, the controller side reports EIO whenever no host has the port open.
        tty.setraw(self._terminal_fd)
        os.set_blocking(self.master_fd, False)
        self.path = os.ttyname(self._terminal_fd)
        if link is not None:
            _replace_link(link, self.path)

    def stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self.stopping = True

    def serve(self) -> None:
        """Serve requests until stop() is called, by a signal handler or another thread."""
        while not self.stopping:
            readable, _, _ = select.select([self.master_fd], [], [], POLL_INTERVAL_S)
            data = b""
            if readable:
                try:
                    data = os.read(self.master_fd, 4096)
                except BlockingIOError:
                    data = b""
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        raise
                    data = b""
            now = _monotonic_ms()
            replies = self.device.receive(data, now) if data else self.device.poll(now)
            for reply in replies:
                _write_all(self.master_fd, reply)

    def close(self) -> None:
        if self.link is not None:
            try:
                if os.readlink(self.link) == self.path:
                    self.link.unlink()
            except OSError:
                pass
        os.close(self.master_fd)
        os.close(self._terminal_fd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m firmware_shim.simulator",
        description="Serve the secure-element firmware protocol on a pseudo-terminal.",
    )
    parser.add_argument(
        "--state-dir",
        required=True,
        type=Path,
        help="directory that keeps keys, slot locks and counters across restarts",
    )
    parser.add_argument(
        "--link",
        type=Path,
        help="keep a symbolic link at this path that points to the current terminal",
    )
    parser.add_argument(
        "--slots", type=int, default=DEFAULT_SLOT_COUNT, help="number of key slots (default 16)"
    )
    parser.add_argument(
        "--allow-fault-injection",
        action="store_true",
        help="accept the FAULT command that corrupts the next reply (for tests only)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    if not 1 <= args.slots <= 255:
        print(f"invalid --slots {args.slots}: give 1 to 255", file=sys.stderr)
        return 2

    element = SoftwareSecureElement(args.state_dir, args.slots)
    simulator = Simulator(FaultInjectingDevice(element, args.allow_fault_injection), args.link)
    signal.signal(signal.SIGTERM, simulator.stop)
    signal.signal(signal.SIGINT, simulator.stop)
    print(simulator.path, flush=True)
    logger.info(
        "serving on %s%s, state in %s",
        simulator.path,
        f" (link {args.link})" if args.link else "",
        args.state_dir,
    )
    try:
        simulator.serve()
    finally:
        simulator.close()
        logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
