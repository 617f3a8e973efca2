"""Board entry point: serve the link protocol on USB CDC or a UART, over an ATECC608.

Copy firmware_shim/ (the board files listed in its __init__.py) to the board and import this
module from the board's own main.py: ``import firmware_shim.main``.

NOTE: never run on a board. The pins, the I2C bus id and the USB CDC handling (the REPL's stdin
with Ctrl-C disabled) are assumptions for an RP2040-class board; adapt the settings below.
"""

import select
import sys
import time

import machine
import micropython

from firmware_shim.atecc608 import Atecc608
from firmware_shim.device import Device

# Link to the host: "usb" for the USB CDC serial port (sys.stdin and sys.stdout), or "uart".
LINK = "usb"
UART_ID = 0
UART_BAUD = 115200
I2C_ID = 0
I2C_SDA = 4
I2C_SCL = 5
# 100 kHz at most, so that the wake pulse is long enough (see atecc608.py).
I2C_FREQUENCY = 100000
POLL_MS = 20


class UsbLink:
    """USB CDC through the REPL's stdin and stdout, with Ctrl-C handling switched off."""

    def __init__(self):
        # Without this, a 0x03 byte in a frame would raise KeyboardInterrupt.
        micropython.kbd_intr(-1)
        self.input = sys.stdin.buffer
        self.output = sys.stdout.buffer
        self.poller = select.poll()
        self.poller.register(sys.stdin, select.POLLIN)

    def read(self, timeout_ms: int) -> bytes:
        data = bytearray()
        while self.poller.poll(timeout_ms if not data else 0):
            data.extend(self.input.read(1))
        return bytes(data)

    def write(self, data: bytes) -> None:
        self.output.write(data)


class UartLink:
    """A hardware UART."""

    def __init__(self):
        self.uart = machine.UART(UART_ID, UART_BAUD)
        self.poller = select.poll()
        self.poller.register(self.uart, select.POLLIN)

    def read(self, timeout_ms: int) -> bytes:
        if not self.poller.poll(timeout_ms):
            return b""
        return self.uart.read() or b""

    def write(self, data: bytes) -> None:
        self.uart.write(data)


class Clock:
    """Milliseconds since start that never wrap, as the frame reader expects.

    time.ticks_ms() wraps (at 2**30 on many ports), so only differences are taken from it.
    """

    def __init__(self):
        self.last = time.ticks_ms()
        self.elapsed = 0

    def now(self) -> int:
        current = time.ticks_ms()
        self.elapsed += time.ticks_diff(current, self.last)
        self.last = current
        return self.elapsed


def run() -> None:
    i2c = machine.I2C(
        I2C_ID, sda=machine.Pin(I2C_SDA), scl=machine.Pin(I2C_SCL), freq=I2C_FREQUENCY
    )
    device = Device(Atecc608(i2c))
    link = UsbLink() if LINK == "usb" else UartLink()
    clock = Clock()
    while True:
        data = link.read(POLL_MS)
        now = clock.now()
        replies = device.receive(data, now) if data else device.poll(now)
        for reply in replies:
            link.write(reply)


run()
