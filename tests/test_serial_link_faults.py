"""Broken frames in both directions on a simulator link: each gives a clear error, then recovers.

Host to device: the test writes the broken bytes itself and reads the device's report.
Device to host: the simulator's FAULT command corrupts its next reply.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_serial import Simulator

from device_sdk.errors import SerialDeviceError, SerialLinkError, SerialTimeoutError
from device_sdk.keys.serial_link import SerialLink
from firmware_shim import protocol, simulator

TIMEOUT = 1.0
COUNTER_READ = bytes((0, protocol.COUNTER_READ))


@pytest.fixture
def link(serial_simulator: Simulator) -> Iterator[SerialLink]:
    link = SerialLink(str(serial_simulator.link), timeout=TIMEOUT)
    link.request(protocol.HELLO)
    yield link
    link.close()


def read_report(link: SerialLink) -> protocol.Frame:
    """Read the device's reply to a broken frame, which arrives without a request."""
    events = link.read_events(2.0)
    assert len(events) == 1, [(event, getattr(event, "payload", b"")) for event in events]
    frame = events[0]
    assert isinstance(frame, protocol.Frame), frame
    return frame


def message_of(frame: protocol.Frame) -> str:
    return frame.payload[1:].decode()


def assert_recovered(link: SerialLink) -> None:
    assert link.request(protocol.COUNTER, COUNTER_READ) == bytes(4)
    assert link.request(protocol.HELLO)[0] == protocol.PROTOCOL_VERSION


# --- host to device ----------------------------------------------------------------------------


def test_host_garbage_reported(link: SerialLink) -> None:
    link.send_raw(b"\xde\xad\xbe\xef" * 8 + b"\x00")

    report = read_report(link)

    assert report.seq == protocol.FRAME_ERROR_SEQ
    assert report.kind == protocol.FRAME_ERROR_KIND
    assert report.status == protocol.BAD_FRAME
    assert message_of(report) == "COBS code runs past the end of the frame"
    assert_recovered(link)


def test_host_garbage_without_delimiter(link: SerialLink) -> None:
    link.send_raw(b"\x11\x22\x33 noise")

    report = read_report(link)

    assert report.status == protocol.FRAME_TIMEOUT
    assert message_of(report) == (
        "partial frame of 9 bytes got no further byte for 200 ms and was dropped"
    )
    assert_recovered(link)


def test_host_truncated_frame_times_out(link: SerialLink) -> None:
    wire = protocol.encode_frame(9, protocol.HELLO, 0, b"")
    link.send_raw(wire[: len(wire) // 2])

    report = read_report(link)

    assert report.status == protocol.FRAME_TIMEOUT
    assert message_of(report).startswith(f"partial frame of {len(wire) // 2 - 1} bytes")
    assert_recovered(link)


def test_host_truncated_then_request(link: SerialLink) -> None:
    truncated = protocol.encode_frame(9, protocol.HELLO, 0, b"")
    request = protocol.encode_frame(10, protocol.COUNTER, 0, COUNTER_READ)
    # One write, so the device's 200 ms gap timeout cannot end the truncated frame first.
    link.send_raw(truncated[: len(truncated) // 2] + request)

    events: list[protocol.Frame | protocol.FrameError] = []
    while len(events) < 2:
        more = link.read_events(2.0)
        assert more, events
        events += more

    report, reply = events
    assert isinstance(report, protocol.Frame)
    assert report.seq == protocol.FRAME_ERROR_SEQ
    assert report.status == protocol.BAD_FRAME
    assert isinstance(reply, protocol.Frame)
    assert reply.seq == 10
    assert reply.status == protocol.OK
    assert reply.payload == bytes(4)
    assert_recovered(link)


def test_host_bad_crc_reported(link: SerialLink) -> None:
    body = protocol.encode_body(7, protocol.HELLO, 0, b"")
    broken = body[:-1] + bytes((body[-1] ^ 0x01,))
    link.send_raw(protocol.wrap(broken))

    report = read_report(link)

    assert report.seq == protocol.FRAME_ERROR_SEQ
    assert report.status == protocol.BAD_CRC
    received = int.from_bytes(broken[-2:], "big")
    computed = int.from_bytes(body[-2:], "big")
    assert message_of(report) == (
        f"CRC 0x{received:04X} does not match the computed 0x{computed:04X}"
    )
    assert_recovered(link)


def test_host_oversize_frame_reported(link: SerialLink) -> None:
    size = protocol.MAX_ENCODED + 10
    link.send_raw(b"\x00" + b"\x55" * size + b"\x00")

    report = read_report(link)

    assert report.status == protocol.FRAME_TOO_LONG
    assert message_of(report) == f"frame of {size} bytes exceeds the maximum {protocol.MAX_ENCODED}"
    assert_recovered(link)


def test_host_oversize_length_reported(link: SerialLink) -> None:
    body = protocol.encode_body_with_length(11, protocol.HELLO, 0, b"", 4000, 1)
    link.send_raw(protocol.wrap(body))

    report = read_report(link)

    # The CRC was valid, so the device names the request's seq and command.
    assert report.seq == 11
    assert report.kind == protocol.HELLO | protocol.REPLY_BIT
    assert report.status == protocol.BAD_LENGTH
    assert message_of(report) == "length field 4000 exceeds the maximum payload 240"
    assert_recovered(link)


def test_host_unsupported_version_reported(link: SerialLink) -> None:
    link.send_raw(protocol.wrap(protocol.encode_body(12, protocol.HELLO, 0, b"", version=2)))

    report = read_report(link)

    assert report.seq == 12
    assert report.status == protocol.UNSUPPORTED_VERSION
    assert message_of(report) == ("protocol version 2 is not supported; this side speaks version 1")
    assert_recovered(link)


def test_host_unknown_command_error(link: SerialLink) -> None:
    with pytest.raises(SerialDeviceError) as caught:
        link.request(0x55)

    assert caught.value.status == protocol.UNKNOWN_COMMAND
    assert caught.value.status_name == "UNKNOWN_COMMAND"
    assert str(caught.value) == (
        f"UNKNOWN_COMMAND on {link.device}: UNKNOWN_COMMAND (0x01): unknown command 0x55"
    )
    assert_recovered(link)


def test_fault_command_unknown_without_option(tmp_path: Path) -> None:
    plain = Simulator(
        state_dir=tmp_path / "state",
        link=tmp_path / "link",
        log_path=tmp_path / "log",
        faults=False,
    )
    plain.start()
    link = SerialLink(str(plain.link), timeout=TIMEOUT)
    try:
        with pytest.raises(SerialDeviceError, match="unknown command 0x7F"):
            link.request(protocol.FAULT, bytes((simulator.FAULT_BAD_CRC,)))
        assert link.info.capabilities & protocol.CAP_FAULT_INJECTION == 0
    finally:
        link.close()
        plain.stop()


# --- device to host ----------------------------------------------------------------------------


def inject(link: SerialLink, fault: int) -> None:
    assert link.request(protocol.FAULT, bytes((fault,))) == b""


def test_device_garbage_times_out(link: SerialLink) -> None:
    inject(link, simulator.FAULT_GARBAGE_ONLY)

    with pytest.raises(SerialTimeoutError) as caught:
        link.request(protocol.COUNTER, COUNTER_READ)

    # The host drops the partial frame after the same gap timeout as the device.
    assert caught.value.bytes_received == 37
    assert f"within {TIMEOUT:g} s: 37 bytes arrived; discarded 1 invalid frame: " in str(
        caught.value
    )
    assert "FRAME_TIMEOUT (37 bytes): partial frame of 37 bytes got no further byte" in str(
        caught.value
    )
    assert_recovered(link)


def test_device_garbage_before_reply_skipped(
    link: SerialLink, caplog: pytest.LogCaptureFixture
) -> None:
    inject(link, simulator.FAULT_GARBAGE_BEFORE)

    with caplog.at_level(logging.WARNING, logger="device_sdk.keys.serial_link"):
        reply = link.request(protocol.COUNTER, COUNTER_READ)

    assert reply == bytes(4)
    assert "discarded a frame from" in caplog.text
    assert_recovered(link)


def test_device_truncated_reply_times_out(link: SerialLink) -> None:
    inject(link, simulator.FAULT_TRUNCATE)

    with pytest.raises(SerialTimeoutError) as caught:
        link.request(protocol.COUNTER, COUNTER_READ)

    # The COUNTER reply is 2 delimiters + COBS(6 header + 4 payload + 2 CRC) = 15 bytes.
    assert caught.value.bytes_received == 7
    assert "7 bytes arrived; discarded 1 invalid frame: FRAME_TIMEOUT (6 bytes)" in str(
        caught.value
    )
    assert_recovered(link)


def test_device_bad_crc_discarded(link: SerialLink) -> None:
    inject(link, simulator.FAULT_BAD_CRC)

    with pytest.raises(
        SerialTimeoutError, match=r"discarded 1 invalid frame: BAD_CRC \(13 bytes\)"
    ):
        link.request(protocol.COUNTER, COUNTER_READ)
    assert_recovered(link)


def test_device_oversize_frame_discarded(link: SerialLink) -> None:
    inject(link, simulator.FAULT_OVERSIZE_FRAME)

    size = protocol.MAX_ENCODED + 50
    with pytest.raises(SerialTimeoutError) as caught:
        link.request(protocol.COUNTER, COUNTER_READ)

    assert caught.value.bytes_received == size + 2
    assert (
        f"FRAME_TOO_LONG ({size} bytes): frame of {size} bytes exceeds the maximum "
        f"{protocol.MAX_ENCODED}" in str(caught.value)
    )
    assert_recovered(link)


def test_device_oversize_length_rejected(link: SerialLink) -> None:
    inject(link, simulator.FAULT_OVERSIZE_LENGTH)

    with pytest.raises(SerialLinkError) as caught:
        link.request(protocol.COUNTER, COUNTER_READ)

    assert str(caught.value) == (
        f"the reply to COUNTER from {link.device} is malformed: BAD_LENGTH: "
        "length field 4000 exceeds the maximum payload 240"
    )
    assert_recovered(link)


def test_device_unknown_status_rejected(link: SerialLink) -> None:
    inject(link, simulator.FAULT_UNKNOWN_STATUS)

    with pytest.raises(SerialDeviceError) as caught:
        link.request(protocol.COUNTER, COUNTER_READ)

    assert caught.value.status == 0x9C
    assert caught.value.status_name == "UNKNOWN_STATUS"
    assert "the device returned unknown status 0x9C" in str(caught.value)
    assert_recovered(link)


def test_device_reply_to_other_command(link: SerialLink) -> None:
    inject(link, simulator.FAULT_WRONG_KIND)

    with pytest.raises(
        SerialLinkError, match=r"is for command 0x01, but COUNTER \(0x05\) was sent"
    ):
        link.request(protocol.COUNTER, COUNTER_READ)
    assert_recovered(link)
