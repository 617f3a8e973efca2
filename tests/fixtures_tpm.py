"""TPM fixtures: swtpm, the TPM 2.0 simulator, on free loopback ports with temporary state.

``swtpm`` is one simulator for the whole session; tests keep apart by using their own persistent
handles or blob paths. ``swtpm_factory`` starts a fresh simulator for a test that changes TPM-wide
state (dictionary-attack lockout, owner authorization). Each simulator is stopped by its PID.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

APT_INSTALL = "apt install swtpm swtpm-tools tpm2-tools libtss2-dev"
SWTPM_MISSING = f"swtpm (the TPM 2.0 simulator) is not installed; install it with: {APT_INSTALL}"
PYTSS_MISSING = (
    "tpm2-pytss is not installed; install it with: apt install libtss2-dev && "
    "pip install 'device-sdk[tpm]'"
)
START_TIMEOUT = 10.0  # seconds for swtpm to accept connections

_handles = itertools.count(0x81000100)


def require_tpm_stack() -> None:
    """Skip the test unless swtpm and tpm2-pytss are installed."""
    if shutil.which("swtpm") is None:
        pytest.skip(SWTPM_MISSING)
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError:
        pytest.skip(PYTSS_MISSING)


def _free_port_pair() -> int:
    """Return a port P where P and P+1 are both free on 127.0.0.1 (swtpm's server and control)."""
    from fixtures_services import free_port

    for _ in range(50):
        port = free_port()
        with socket.socket() as second:
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two adjacent free TCP ports on 127.0.0.1 after 50 tries")


@dataclass
class Swtpm:
    """A running swtpm: its TCTI string, state directory and process."""

    port: int
    state_dir: Path
    process: subprocess.Popen[bytes] | None
    log_path: Path

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def handle_uri(self, handle: int | None = None) -> str:
        """A ``tpm2:handle=`` URI on this simulator; a fresh handle unless one is given."""
        value = next(_handles) if handle is None else handle
        return f"tpm2:handle=0x{value:08x}?tcti={self.tcti}"

    def path_uri(self, path: Path) -> str:
        """A ``tpm2:path=`` URI for a key blob at ``path`` on this simulator."""
        return f"tpm2:path={path}?tcti={self.tcti}"

    def environment(self) -> dict[str, str]:
        """Environment for a subprocess (tpm2-tools, another Python) that uses this simulator."""
        env = dict(os.environ)
        env["TPM2TOOLS_TCTI"] = self.tcti
        return env

    def stop(self) -> None:
        from device_sdk.keys.tpm_connection import close_connections

        # Connections to a stopped simulator would fail on their next use.
        close_connections()
        self.stop_process()

    def stop_process(self) -> None:
        """Stop swtpm by its PID and leave this process's TPM connections as they are."""
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def start_process(self) -> None:
        """Start swtpm on this port with this state, and wait until it accepts connections."""
        command = [
            "swtpm", "socket", "--tpm2",
            "--server", f"type=tcp,bindaddr=127.0.0.1,port={self.port}",
            "--ctrl", f"type=tcp,bindaddr=127.0.0.1,port={self.port + 1}",
            "--flags", "not-need-init,startup-clear",
            "--tpmstate", f"dir={self.state_dir}",
            "--log", f"file={self.log_path}",
        ]  # fmt: skip
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        self.process = process

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise RuntimeError(f"swtpm exited with status {process.returncode}: {log[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop_process()
                    raise RuntimeError(
                        f"swtpm did not accept connections on port {self.port} within "
                        f"{START_TIMEOUT} s"
                    ) from None
                time.sleep(0.02)


def start_swtpm(state_dir: Path) -> Swtpm:
    """Start swtpm on free loopback ports with its state in ``state_dir``, and wait for it."""
    require_tpm_stack()
    state_dir.mkdir(parents=True, exist_ok=True)
    swtpm = Swtpm(_free_port_pair(), state_dir, None, state_dir / "swtpm.log")
    swtpm.start_process()
    return swtpm


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """One swtpm for the session; use fresh handles (``handle_uri()``) or blob paths per test."""
    instance = start_swtpm(tmp_path_factory.mktemp("swtpm"))
    yield instance
    instance.stop()


@pytest.fixture
def swtpm_factory(tmp_path: Path) -> Iterator[Callable[[], Swtpm]]:
    """A factory of fresh simulators, each stopped at the end of the test."""
    started: list[Swtpm] = []

    def make() -> Swtpm:
        instance = start_swtpm(tmp_path / f"swtpm-{len(started)}")
        started.append(instance)
        return instance

    yield make
    for instance in started:
        instance.stop()


@dataclass
class EndorsementCA:
    """The local CA that swtpm_localca made to issue EK certificates: root and issuing CA."""

    root_path: Path
    issuer_path: Path


def manufacture(state_dir: Path, ca_dir: Path) -> EndorsementCA:
    """Run swtpm_setup on ``state_dir``: EKs, and EK certificates from a local CA in ``ca_dir``."""
    if shutil.which("swtpm_setup") is None or shutil.which("swtpm_localca") is None:
        pytest.skip(f"swtpm_setup is not installed; install it with: {APT_INSTALL}")
    state_dir.mkdir(parents=True, exist_ok=True)
    ca_dir.mkdir(parents=True, exist_ok=True)
    localca_conf = ca_dir / "swtpm-localca.conf"
    localca_conf.write_text(
        f"statedir = {ca_dir}\n"
        f"signingkey = {ca_dir / 'signkey.pem'}\n"
        f"issuercert = {ca_dir / 'issuercert.pem'}\n"
        f"certserial = {ca_dir / 'certserial'}\n"
    )
    options = ca_dir / "swtpm-localca.options"
    options.write_text("")
    setup_conf = ca_dir / "swtpm_setup.conf"
    setup_conf.write_text(
        "create_certs_tool = swtpm_localca\n"
        f"create_certs_tool_config = {localca_conf}\n"
        f"create_certs_tool_options = {options}\n"
        "active_pcr_banks = sha256\n"
    )
    completed = subprocess.run(
        [
            "swtpm_setup", "--tpm2", "--tpmstate", str(state_dir), "--create-ek-cert",
            "--config", str(setup_conf), "--overwrite",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if completed.returncode != 0:
        raise RuntimeError(f"swtpm_setup failed: {completed.stdout[-2000:]}{completed.stderr}")
    return EndorsementCA(ca_dir / "swtpm-localca-rootca-cert.pem", ca_dir / "issuercert.pem")


@pytest.fixture(scope="session")
def swtpm_with_ek(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Swtpm, EndorsementCA]]:
    """A simulator manufactured with EK certificates, and the local CA that issued them."""
    require_tpm_stack()
    base = tmp_path_factory.mktemp("swtpm-ek")
    ca = manufacture(base / "state", base / "ca")
    instance = start_swtpm(base / "state")
    yield instance, ca
    instance.stop()


@dataclass
class Abrmd:
    """tpm2-abrmd in front of its own swtpm, on a private D-Bus session bus."""

    swtpm: Swtpm
    bus_address: str
    processes: list[subprocess.Popen[bytes]]
    tcti: str = "tabrmd:bus_type=session"

    def environment(self) -> dict[str, str]:
        """Environment for a subprocess that reaches the TPM through this resource manager."""
        env = dict(os.environ)
        env["DBUS_SESSION_BUS_ADDRESS"] = self.bus_address
        env["TPM2TOOLS_TCTI"] = self.tcti
        return env

    def stop(self) -> None:
        from device_sdk.keys.tpm_connection import close_connections

        close_connections()
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
        self.swtpm.stop()


def _wait_for(probe: Callable[[], bool], what: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not probe():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready within {START_TIMEOUT} s")
        time.sleep(0.05)


def start_abrmd(directory: Path) -> Abrmd:
    """Start swtpm, a private D-Bus session bus and tpm2-abrmd on it; wait until a command works."""
    for binary, package in (
        ("tpm2-abrmd", "tpm2-abrmd libtss2-tcti-tabrmd0"),
        ("dbus-daemon", "dbus"),
    ):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} is not installed; install it with: apt install {package}")
    simulator = start_swtpm(directory / "swtpm")
    bus_path = directory / "bus"
    bus_address = f"unix:path={bus_path}"
    processes: list[subprocess.Popen[bytes]] = []
    abrmd = Abrmd(simulator, bus_address, processes)
    try:
        with open(directory / "dbus.log", "wb") as log:
            dbus = subprocess.Popen(
                [
                    "dbus-daemon", "--config-file=/usr/share/dbus-1/session.conf", "--nofork",
                    f"--address={bus_address}",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        processes.append(dbus)
        _wait_for(bus_path.exists, "dbus-daemon", dbus)

        env = abrmd.environment()
        with open(directory / "abrmd.log", "wb") as log:
            daemon = subprocess.Popen(
                [
                    "tpm2-abrmd", "--session", "--allow-root", "--flush-all",
                    f"--tcti={simulator.tcti}",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        processes.append(daemon)

        def answers() -> bool:
            probe = subprocess.run(
                ["tpm2_getrandom", "--hex", "4"], capture_output=True, env=env, timeout=10
            )
            return probe.returncode == 0

        _wait_for(answers, "tpm2-abrmd", daemon)
    except BaseException:
        abrmd.stop()
        raise
    return abrmd


@pytest.fixture(scope="module")
def tpm_abrmd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Abrmd]:
    """tpm2-abrmd and its swtpm for a module; this process reaches it through ``abrmd.tcti``."""
    require_tpm_stack()
    abrmd = start_abrmd(tmp_path_factory.mktemp("abrmd"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DBUS_SESSION_BUS_ADDRESS", abrmd.bus_address)
        yield abrmd
    abrmd.stop()
