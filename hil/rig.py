"""One rig run: the inventory's devices made reachable, the rig's servers, and the results.

:class:`Rig` starts the simulators of simulated devices and the verifier and broker, and gives
each device a :class:`DeviceHandle` that scenarios use: provision it, start an agent on it, cut
and restore its power, erase it. Results and measurements land in :attr:`Rig.results`, from
which :mod:`hil.report` writes the report.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hil.inventory import Device, Inventory
from hil.power import CallbackSwitch, PowerControl, power_control
from hil.services import RigServices
from hil.sim import SimulatedDevice, simulator_for
from hil.transport import AgentSession, Transport, transport_for

logger = logging.getLogger(__name__)

PROVISION_TIMEOUT = 180.0
DEFAULT_CONNECT_COUNT = 10


class DeviceInUseError(RuntimeError):
    """A destructive scenario found keys on the token of a device not marked disposable."""


@dataclass
class ProvisionRun:
    """One ``device-sdk provision`` run: exit status, output, and the JSON result if any."""

    status: int | None
    stdout: str
    stderr: str
    seconds: float
    killed_after: str | None = None


@dataclass
class DeviceHandle:
    """One device during a rig run: its transport, simulator, power switch and provisioning."""

    device: Device
    transport: Transport
    workdir: str
    rig: Rig
    sim: SimulatedDevice | None = None
    switch: PowerControl | None = None
    provisioned: bool = False
    device_id: str | None = None
    runs: int = 0
    generation: int = 1

    @property
    def name(self) -> str:
        return self.device.name

    @property
    def config_path(self) -> str:
        return f"{self.workdir}/device-{self.generation}.toml"

    @property
    def key_uri(self) -> str:
        return self.sim.key_uri() if self.sim is not None else self.device.key

    # --- agent --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def agent(self, *, config: bool = True) -> Iterator[AgentSession]:
        """Run ``device-sdk hil-agent`` on the device for the block; stop it afterwards."""
        args = ["--config", self.config_path] if config else ["--key", self.key_uri]
        session = self.transport.agent(args)
        try:
            yield session
        finally:
            session.close()

    def key_labels(self) -> list[str] | None:
        """Return the labels of the keys in the device's key store, or None if it cannot list.

        Raises DeviceInUseError when the listing fails, because the rig then cannot tell
        whether the token is in use.
        """
        with self.agent(config=False) as session:
            reply = session.call("keys")
        if not reply["ok"]:
            logger.warning("device %s: listing keys failed: %s", self.name, reply["error"])
            raise DeviceInUseError(
                f"device {self.name}: listing the keys on the token failed "
                f"({reply['error_type']}: {reply['error']}), so the rig cannot tell whether the "
                "token is in use; check the token and its PIN file"
            )
        if not reply.get("supported"):
            return None
        return list(reply["labels"])

    def key_opens(self) -> bool:
        with self.agent(config=False) as session:
            return bool(session.call("hello")["ok"])

    # --- destructive steps --------------------------------------------------------------------

    def require_blank(self) -> None:
        """Ensure the token contains no keys: erase a disposable device, raise for any other."""
        try:
            labels = self.key_labels()
        except DeviceInUseError:
            if not self.device.disposable:
                raise
            self.erase()
            return
        in_use = bool(labels) if labels is not None else self.key_opens()
        if not in_use:
            return
        contents = f"contains keys {labels}" if labels else "contains the configured key"
        if not self.device.disposable:
            raise DeviceInUseError(
                f"device {self.name}: the token {contents} and the device is not marked "
                "disposable; set disposable = true in the inventory to let the rig erase it"
            )
        self.erase()

    def erase(self) -> None:
        logger.info("device %s: erasing the token (disposable)", self.name)
        if self.sim is not None:
            self.sim.reset()
            self.transport.env.update(self.sim.env)
        elif self.device.reset:
            self._run_reset(self.device.reset)
        else:
            raise DeviceInUseError(
                f"device {self.name} is disposable but has no 'reset' command to erase its token"
            )
        self.provisioned = False
        self.device_id = None
        # The next run writes a new config: the state file of an earlier run names a key that
        # is gone now, and provisioning would resume from it.
        self.generation += 1

    def _run_reset(self, command: str) -> None:
        # The bench owner writes this command in the inventory, like the power commands.
        result = subprocess.run(  # noqa: S602
            command, shell=True, capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            raise DeviceInUseError(
                f"device {self.name}: the reset command {command!r} failed with status "
                f"{result.returncode}: {result.stderr.strip()[-500:]}"
            )

    # --- provisioning -------------------------------------------------------------------------

    def provision_args(self, token_file: str, algorithm: str) -> list[str]:
        args = [
            "provision", "--key", self.key_uri, "--verifier", self.rig.services.verifier_url,
            "--enrollment-token-file", token_file, "--config", self.config_path,
            "--ca-bundle", f"{self.workdir}/ca.pem", "--broker", self.rig.services.broker_url,
            "--algorithm", algorithm,
        ]  # fmt: skip
        if self.device.software_key:
            args.append("--allow-software-key")
        return args

    def new_enrollment_token(self) -> str:
        self.runs += 1
        path = f"{self.workdir}/enrollment-{self.runs}.token"
        token = self.rig.services.create_enrollment_token()
        self.transport.write_file(path, (token + "\n").encode(), 0o600)
        return path

    def provision(
        self,
        token_file: str,
        algorithm: str,
        *,
        cut_after: str | None = None,
        on_cut: Callable[[subprocess.Popen[str]], None] | None = None,
    ) -> ProvisionRun:
        """Run ``device-sdk provision``; with ``cut_after``, call ``on_cut`` once that step is done.

        ``on_cut`` is the power cut: it must end the provisioning process (by cutting the board's
        power, or by killing the local process) so the run stops where it is.
        """
        self.transport.env["PYTHONUNBUFFERED"] = "1"
        process = self.transport.popen(self.provision_args(token_file, algorithm))
        started = time.monotonic()
        lines: list[str] = []
        killed_after = None
        assert process.stdout is not None and process.stderr is not None

        # stderr is drained meanwhile, so a chatty run cannot fill the pipe and stall stdout.
        errors: list[str] = []
        drain = threading.Thread(target=_read_lines, args=(process.stderr, errors), daemon=True)
        drain.start()
        for line in process.stdout:
            lines.append(line)
            step = line.split()[0] if line.startswith("  ") and line.split() else None
            if cut_after is not None and step == cut_after and killed_after is None:
                killed_after = step
                assert on_cut is not None
                on_cut(process)
                break
        try:
            stdout_rest = process.stdout.read()
            process.wait(timeout=PROVISION_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        drain.join(timeout=10)
        process.stdout.close()
        return ProvisionRun(
            status=process.returncode,
            stdout="".join(lines) + stdout_rest,
            stderr="".join(errors),
            seconds=time.monotonic() - started,
            killed_after=killed_after,
        )

    def kill_process_group(self, process: subprocess.Popen[str]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def _read_lines(stream: IO[str], into: list[str]) -> None:
    into.extend(stream)


@dataclass
class Rig:
    """The devices, servers and results of one run of ``pytest hil --rig FILE``."""

    inventory: Inventory
    report_dir: Path
    sign_count: int
    connect_count: int = DEFAULT_CONNECT_COUNT
    # Work directory for servers, simulators and local devices; set before start().
    directory: Path = field(default_factory=Path)
    services: RigServices = field(init=False)
    handles: dict[str, DeviceHandle] = field(default_factory=dict)
    setup_errors: dict[str, str] = field(default_factory=dict)
    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    def start(self) -> None:
        self.services = RigServices(self.directory / "services", self.inventory.services)
        self.services.start()
        for device in self.inventory.devices:
            # One unreachable board or missing simulator fails that device's scenarios only.
            try:
                self.handles[device.name] = self._handle(device)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                logger.error("device %s: set-up failed: %s", device.name, exc)
                self.setup_errors[device.name] = f"{type(exc).__name__}: {exc}"

    def _handle(self, device: Device) -> DeviceHandle:
        env: dict[str, str] = {}
        sim = None
        if device.sim is not None:
            sim = simulator_for(device, self.directory / "sim")
            sim.start()
            env.update(sim.env)
        if device.access.kind == "local":
            workdir = device.workdir or str(self.directory / "devices" / device.name)
            # Provisioning locks live with the run, so an aborted run leaves none behind.
            env["DEVICE_SDK_LOCK_DIR"] = str(Path(workdir) / "locks")
        else:
            workdir = device.workdir or ".device-sdk-hil"
        transport = transport_for(device, env)
        switch: PowerControl | None = power_control(device)
        if sim is not None and device.power.kind == "sim":
            switch = CallbackSwitch(device, sim.cut_power, sim.start)
        handle = DeviceHandle(device, transport, workdir, self, sim=sim, switch=switch)
        transport.write_file(f"{workdir}/ca.pem", self.services.pki.ca.read_bytes(), 0o644)
        return handle

    @property
    def started(self) -> bool:
        return hasattr(self, "services")

    def stop(self) -> None:
        for handle in self.handles.values():
            if handle.sim is not None:
                handle.sim.stop()
        with contextlib.suppress(AttributeError):
            self.services.stop()

    def record(self, device: str, scenario: str, **values: Any) -> None:
        entry = self.results.setdefault(device, {}).setdefault(scenario, {})
        entry.setdefault("metrics", {}).update(values)

    def set_outcome(self, device: str, scenario: str, outcome: str, detail: str = "") -> None:
        entry = self.results.setdefault(device, {}).setdefault(scenario, {})
        entry["outcome"] = outcome
        if detail:
            entry["detail"] = detail
