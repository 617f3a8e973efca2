"""Simulated devices for the simulated bench: a SoftHSM token, swtpm, the firmware-shim simulator.

Each simulator keeps its state in a directory, so stopping and starting its process is a power
cycle that keeps the keys, and erasing the directory is a factory reset. ``power off`` kills the
process (swtpm, the firmware-shim simulator) with SIGKILL, so it cannot flush or close anything.
A SoftHSM token has no process of its own. Its power cut is the kill of the host processes that
use it, which the scenarios do themselves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hil.inventory import Device

logger = logging.getLogger(__name__)

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class SimulatorError(RuntimeError):
    """A simulator did not start or stop; the message names the device and shows its log."""


class SimulatedDevice:
    """The simulator behind one inventory device; subclasses per simulator kind."""

    def __init__(self, device: Device, state_dir: Path) -> None:
        self.device = device
        self.state_dir = state_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir.parent / f"{state_dir.name}.log"
        self.env: dict[str, str] = {}

    def placeholders(self) -> dict[str, str]:
        return {"state": str(self.state_dir)}

    def key_uri(self) -> str:
        uri = self.device.key
        for name, value in self.placeholders().items():
            uri = uri.replace("{" + name + "}", value)
        return uri

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        """Stop the simulator cleanly (SIGTERM), as a shutdown before a reset would."""
        self._end(signal.SIGTERM)

    def cut_power(self) -> None:
        """Kill the simulator with SIGKILL: no chance to flush or close, as in a power cut."""
        self._end(signal.SIGKILL)

    def _end(self, signum: int) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT)
        logger.info("device %s: simulator (PID %d) stopped", self.device.name, process.pid)
        self.process = None

    def reset(self) -> None:
        """Erase the device: stop it, delete its state and start it blank."""
        self.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.start()

    def _spawn(self, argv: list[str], *, stdout: int | None = None) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout or log,
                stderr=log,
                start_new_session=True,
            )
        logger.info(
            "device %s: simulator started (PID %d): %s",
            self.device.name,
            process.pid,
            " ".join(argv),
        )
        return process

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _wait(self, probe: object, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise SimulatorError(
                    f"device {self.device.name}: {what}: the simulator exited with status "
                    f"{self.process.returncode}; log:\n{self._log_tail()}"
                )
            if probe():  # type: ignore[operator]
                return
            if time.monotonic() > deadline:
                raise SimulatorError(
                    f"device {self.device.name}: {what} not ready after {START_TIMEOUT:.0f} s; "
                    f"log:\n{self._log_tail()}"
                )
            time.sleep(0.02)


class SoftHSMDevice(SimulatedDevice):
    """A SoftHSM token in its own store; its user PIN file is ``{state}/<token>.user-pin``."""

    def start(self) -> None:
        from device_sdk.keys import softhsm

        super().start()
        assert self.device.sim is not None
        conf = self.state_dir / "softhsm2.conf"
        if conf.exists():
            store = softhsm.TokenStore(self.state_dir, conf, self.state_dir / "tokens")
        else:
            store = softhsm.create_store(self.state_dir)
            softhsm.init_token(store, self.device.sim.token)
        self.env = store.environment()

    @property
    def running(self) -> bool:
        return True


def _free_port_pair() -> int:
    """Return a port P where P and P+1 are free on 127.0.0.1 (swtpm's server and control)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise SimulatorError("no two adjacent free TCP ports on 127.0.0.1 after 50 tries")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class SwtpmDevice(SimulatedDevice):
    """swtpm on a fixed loopback port pair, so the ``{tcti}`` in the key URI survives restarts."""

    def __init__(self, device: Device, state_dir: Path) -> None:
        super().__init__(device, state_dir)
        self.port = _free_port_pair()

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def placeholders(self) -> dict[str, str]:
        return {**super().placeholders(), "tcti": self.tcti}

    def start(self) -> None:
        super().start()
        binary = shutil.which("swtpm")
        if binary is None:
            raise SimulatorError(
                f"device {self.device.name}: swtpm not found; install it with: "
                "sudo apt-get install -y swtpm swtpm-tools"
            )
        argv = [
            binary, "socket", "--tpm2",
            "--server", f"type=tcp,bindaddr=127.0.0.1,port={self.port}",
            "--ctrl", f"type=tcp,bindaddr=127.0.0.1,port={self.port + 1}",
            "--flags", "not-need-init,startup-clear",
            "--tpmstate", f"dir={self.state_dir}",
        ]  # fmt: skip
        self.process = self._spawn(argv)
        self._wait(lambda: _accepts(self.port), f"swtpm on port {self.port}")


class FirmwareShimDevice(SimulatedDevice):
    """The firmware-shim simulator on a pseudo-terminal, reached through ``{state}/tty``."""

    @property
    def link(self) -> Path:
        return self.state_dir.parent / f"{self.state_dir.name}.tty"

    def placeholders(self) -> dict[str, str]:
        return {**super().placeholders(), "tty": str(self.link)}

    def start(self) -> None:
        super().start()
        assert self.device.sim is not None
        argv = [
            sys.executable, "-m", "firmware_shim.simulator",
            "--state-dir", str(self.state_dir), "--link", str(self.link),
            "--slots", str(self.device.sim.slots), "--log-level", "WARNING",
        ]  # fmt: skip
        self.process = self._spawn(argv, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        # The first stdout line is the terminal path; the link is replaced just before it.
        first = self.process.stdout.readline().decode().strip()
        if not first:
            self._wait(lambda: False, "firmware-shim simulator")
        self._wait(lambda: self.link.exists(), f"terminal link {self.link}")


SIMULATORS: dict[str, type[SimulatedDevice]] = {
    "softhsm": SoftHSMDevice,
    "swtpm": SwtpmDevice,
    "firmware-shim": FirmwareShimDevice,
}


def simulator_for(device: Device, base: Path) -> SimulatedDevice:
    assert device.sim is not None
    return SIMULATORS[device.sim.kind](device, base / device.name)
