"""Fixtures for serial secure element tests: the firmware simulator on a pseudo-terminal.

The simulator runs as a child process (``python -m firmware_shim.simulator``) with its state in
a temporary directory and a stable ``--link`` path, and is stopped by PID.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from device_sdk.keys import serial as serial_keys

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


@dataclass
class Simulator:
    """A simulator process; ``start()`` may be called again after ``stop()`` (a power cycle)."""

    state_dir: Path
    link: Path
    log_path: Path
    faults: bool = True
    process: subprocess.Popen[bytes] | None = None
    pty_path: str = ""
    starts: int = field(default=0)

    @property
    def uri(self) -> str:
        return f"serial:{self.link}?slot=0"

    def uri_for_slot(self, slot: int) -> str:
        return f"serial:{self.link}?slot={slot}"

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "firmware_shim.simulator",
            "--state-dir",
            str(self.state_dir),
            "--link",
            str(self.link),
            "--log-level",
            "DEBUG",
        ]
        if self.faults:
            command.append("--allow-fault-injection")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps the descriptor
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log, start_new_session=True
        )
        log.close()
        self.pty_path = self._read_path()
        self.starts += 1

        deadline = time.monotonic() + START_TIMEOUT
        while not (self.link.is_symlink() and os.readlink(self.link) == self.pty_path):
            if time.monotonic() > deadline:
                raise AssertionError(f"simulator link {self.link} never pointed to {self.pty_path}")
            time.sleep(0.01)

    def _read_path(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + START_TIMEOUT
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                raise AssertionError(
                    f"simulator printed no path within {START_TIMEOUT} s: "
                    f"{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            if selector.select(remaining):
                chunk = os.read(self.process.stdout.fileno(), 1)
                if not chunk:
                    continue
                line += chunk
        selector.close()
        return line.decode().strip()

    def stop(self) -> int:
        """Stop the simulator with SIGTERM by PID and return its exit status."""
        process = self.process
        assert process is not None
        self.process = None
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            status = process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            status = process.wait(timeout=STOP_TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()
        return status


@pytest.fixture
def serial_simulator(tmp_path: Path) -> Iterator[Simulator]:
    """A running simulator with fault injection allowed; every serial link is closed after."""
    simulator = Simulator(
        state_dir=tmp_path / "se-state", link=tmp_path / "se-link", log_path=tmp_path / "se.log"
    )
    simulator.start()
    try:
        yield simulator
    finally:
        serial_keys.close_links()
        if simulator.process is not None:
            simulator.stop()
