"""Power control: switch a device, or the USB port its token sits in, off and on.

Kinds, as the inventory names them:

- ``none``: no power control; scenarios that need it are skipped.
- ``command``: shell commands on the rig host, for a smart plug or a PDU with its own CLI.
- ``usb-relay``: an LCUS-type serial relay board (CH340, 9600 baud) that takes the four-byte
  frame ``A0 channel state checksum``, where the checksum is the low byte of the sum of the
  other three.
- ``uhubctl``: per-port power switching of a USB hub that supports it, through ``uhubctl``.
- ``sim``: the rig stops and restarts a simulated device's process (see :mod:`hil.sim`).
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from typing import Protocol

from hil.inventory import Device, Power

logger = logging.getLogger(__name__)

RELAY_START = 0xA0
COMMAND_TIMEOUT = 60.0


class PowerError(RuntimeError):
    """A power switch command failed; the message names the device and the command."""


class PowerControl(Protocol):
    def off(self) -> None: ...

    def on(self) -> None: ...


def relay_frame(channel: int, state: bool) -> bytes:
    """Return the LCUS relay frame that switches ``channel`` (from 1) on or off."""
    if not 1 <= channel <= 0xFF:
        raise ValueError(f"invalid relay channel {channel}: use 1 to 255")
    body = bytes([RELAY_START, channel, 1 if state else 0])
    return body + bytes([sum(body) & 0xFF])


def uhubctl_argv(power: Power, state: bool) -> list[str]:
    assert power.location is not None and power.hub_port is not None
    action = "on" if state else "off"
    return ["uhubctl", "-l", power.location, "-p", str(power.hub_port), "-a", action]


class _Switch:
    """Common part: log each switch and wait ``settle`` seconds after switching on."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.power = device.power

    def _switch(self, state: bool) -> None:
        raise NotImplementedError

    def off(self) -> None:
        logger.info("device %s: power off (%s)", self.device.name, self.power.kind)
        self._switch(False)

    def on(self) -> None:
        logger.info("device %s: power on (%s)", self.device.name, self.power.kind)
        self._switch(True)
        time.sleep(self.power.settle)

    def _run(self, argv: list[str] | str, *, shell: bool = False) -> None:
        try:
            result = subprocess.run(
                argv,
                shell=shell,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PowerError(
                f"device {self.device.name}: power command {argv!r} failed: {exc}"
            ) from exc
        if result.returncode != 0:
            raise PowerError(
                f"device {self.device.name}: power command {argv!r} exited with status "
                f"{result.returncode}: {result.stderr.strip()[-500:]}"
            )


class CommandSwitch(_Switch):
    def _switch(self, state: bool) -> None:
        command = self.power.on if state else self.power.off
        assert command is not None
        self._run(command, shell=True)  # noqa: S602, S604 - the bench owner writes these


class UhubctlSwitch(_Switch):
    def _switch(self, state: bool) -> None:
        self._run(uhubctl_argv(self.power, state))


class UsbRelaySwitch(_Switch):
    def _switch(self, state: bool) -> None:
        import serial

        assert self.power.port is not None and self.power.channel is not None
        try:
            with serial.Serial(self.power.port, self.power.baud, timeout=2) as port:
                port.write(relay_frame(self.power.channel, state))
                port.flush()
        except serial.SerialException as exc:
            raise PowerError(
                f"device {self.device.name}: relay on {self.power.port} channel "
                f"{self.power.channel}: {exc}"
            ) from exc


class CallbackSwitch(_Switch):
    """Power for a simulated device: ``stop`` and ``start`` its process."""

    def __init__(self, device: Device, stop: Callable[[], None], start: Callable[[], None]) -> None:
        super().__init__(device)
        self._stop = stop
        self._start = start

    def _switch(self, state: bool) -> None:
        (self._start if state else self._stop)()


def power_control(device: Device) -> PowerControl | None:
    """Return the device's power switch, or None for ``none`` and ``sim`` (the rig wires sim)."""
    kind = device.power.kind
    if kind == "command":
        return CommandSwitch(device)
    if kind == "uhubctl":
        return UhubctlSwitch(device)
    if kind == "usb-relay":
        return UsbRelaySwitch(device)
    return None
