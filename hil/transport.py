"""Command transports that run ``device-sdk`` for a device: locally, or over SSH on a board.

Both transports run the same commands (``device-sdk provision``, ``device-sdk hil-agent``), so
a simulated device on the rig host and a Raspberry Pi on the bench go through one code path.
Secrets never appear on a command line: files such as the enrollment token travel on the
standard input of a remote ``cat``, and the remote shell creates them with mode 0600.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from hil.inventory import Access, Device

logger = logging.getLogger(__name__)

# SSH options for unattended runs: never prompt, fail fast on an unreachable board, and keep
# the connection alive while a long scenario runs.
SSH_OPTIONS = (
    "-o",
    "BatchMode=yes",
    "-o",
    "ConnectTimeout=10",
    "-o",
    "ServerAliveInterval=15",
    "-o",
    "ServerAliveCountMax=3",
)
AGENT_REPLY_TIMEOUT = 120.0


class TransportError(RuntimeError):
    """A command for a device could not be run, or its agent stopped replying."""


class Transport:
    """Runs ``device-sdk`` commands for one device; subclasses decide where."""

    def __init__(self, device: Device, env: Mapping[str, str] | None = None) -> None:
        self.device = device
        self.env = dict(env or {})

    def argv(self, args: Sequence[str]) -> list[str]:
        """Return the full command line that runs ``device-sdk ARGS`` for the device."""
        raise NotImplementedError

    def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        """Write ``data`` to ``path`` on the device, creating the file with ``mode``."""
        raise NotImplementedError

    def popen(
        self, args: Sequence[str], *, stdin: int | None = subprocess.DEVNULL
    ) -> subprocess.Popen[str]:
        """Start ``device-sdk ARGS`` with stdout and stderr as pipes, in its own process group."""
        argv = self.argv(args)
        logger.info("device %s: running %s", self.device.name, shlex.join(argv))
        return subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.process_env(),
            start_new_session=True,
        )

    def process_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        return env

    def run(
        self, args: Sequence[str], *, timeout: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``device-sdk ARGS`` to completion and return its exit status and output."""
        process = self.popen(args)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            raise TransportError(
                f"device {self.device.name}: `device-sdk {' '.join(args)}` did not finish within "
                f"{timeout:.0f} s; stderr: {stderr[-2000:]}"
            ) from None
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def agent(self, args: Sequence[str]) -> AgentSession:
        """Start ``device-sdk hil-agent ARGS`` and return a session to send it operations."""
        process = self.popen(["hil-agent", *args], stdin=subprocess.PIPE)
        return AgentSession(self.device.name, process)


class LocalTransport(Transport):
    """Runs ``device-sdk`` on the rig host, with the device's environment (SOFTHSM2_CONF, ...)."""

    def argv(self, args: Sequence[str]) -> list[str]:
        command = self.device.access.command
        if command == "device-sdk":
            # The rig's own interpreter runs the same installation, on PATH or not.
            return [sys.executable, "-m", "device_sdk", *args]
        return [*shlex.split(command), *args]

    def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(target, mode)


class SSHTransport(Transport):
    """Runs ``device-sdk`` on a board over SSH with BatchMode, so a missing key fails at once.

    Environment variables for the device (``env``) are set by the remote shell in front of the
    command, so they need no ``AcceptEnv`` on the board's SSH server. They must not be secrets.
    """

    def ssh_prefix(self) -> list[str]:
        access: Access = self.device.access
        assert access.host is not None and access.user is not None
        argv = ["ssh", *SSH_OPTIONS, "-p", str(access.port)]
        if access.identity_file:
            argv += ["-i", access.identity_file]
        argv.append(f"{access.user}@{access.host}")
        return argv

    def remote_command(self, args: Sequence[str]) -> str:
        assignments = [f"{name}={shlex.quote(value)}" for name, value in sorted(self.env.items())]
        command = shlex.split(self.device.access.command)
        words = [*assignments, *(shlex.quote(word) for word in command), *map(shlex.quote, args)]
        if assignments:
            words.insert(0, "env")
        return " ".join(words)

    def argv(self, args: Sequence[str]) -> list[str]:
        # ssh joins its arguments with spaces and hands them to the remote shell, so the remote
        # command is one pre-quoted string.
        return [*self.ssh_prefix(), "--", self.remote_command(args)]

    def write_file_argv(self, path: str, mode: int = 0o600) -> list[str]:
        directory = shlex.quote(str(Path(path).parent))
        target = shlex.quote(path)
        umask = f"{0o777 & ~mode:03o}"
        script = (
            f"umask {umask} && mkdir -p {directory} && cat > {target} && chmod {mode:o} {target}"
        )
        return [*self.ssh_prefix(), "--", script]

    def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        result = subprocess.run(
            self.write_file_argv(path, mode),
            input=data,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise TransportError(
                f"device {self.device.name}: writing {path} over ssh failed with status "
                f"{result.returncode}: {result.stderr.decode(errors='replace')[-500:]}"
            )

    def process_env(self) -> dict[str, str]:
        # The device's variables travel in the remote command, not in ssh's own environment.
        return dict(os.environ)


def transport_for(device: Device, env: Mapping[str, str] | None = None) -> Transport:
    if device.access.kind == "ssh":
        return SSHTransport(device, env)
    return LocalTransport(device, env)


class AgentSession:
    """A running ``device-sdk hil-agent``: one JSON operation per line in, one reply out."""

    def __init__(self, device_name: str, process: subprocess.Popen[str]) -> None:
        self.device_name = device_name
        self.process = process
        self._stderr: list[str] = []
        assert process.stderr is not None
        self._stderr_thread = threading.Thread(
            target=self._collect, args=(process.stderr,), daemon=True
        )
        self._stderr_thread.start()

    def _collect(self, stream: IO[str]) -> None:
        for line in stream:
            self._stderr.append(line)

    def stderr_tail(self, lines: int = 20) -> str:
        return "".join(self._stderr[-lines:])

    def call(
        self, op: str, reply_timeout: float = AGENT_REPLY_TIMEOUT, **params: Any
    ) -> dict[str, Any]:
        """Send one operation and return the agent's reply (``ok`` is False for a failed op).

        ``params`` become the operation's fields; ``reply_timeout`` is how long the rig waits for
        the reply, in seconds.
        """
        assert self.process.stdin is not None and self.process.stdout is not None
        request = json.dumps({"op": op, **params})
        try:
            self.process.stdin.write(request + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise TransportError(
                f"device {self.device_name}: the agent exited (status {self.process.poll()}); "
                f"stderr:\n{self.stderr_tail()}"
            ) from None

        reply: list[str] = []
        reader = threading.Thread(target=lambda: reply.append(self.process.stdout.readline()))  # type: ignore[union-attr]
        reader.daemon = True
        reader.start()
        reader.join(reply_timeout)
        if reader.is_alive():
            raise TransportError(
                f"device {self.device_name}: no reply to {op!r} within {reply_timeout:.0f} s; "
                f"stderr:\n{self.stderr_tail()}"
            )
        if not reply or not reply[0]:
            raise TransportError(
                f"device {self.device_name}: the agent closed its output during {op!r} (status "
                f"{self.process.poll()}); stderr:\n{self.stderr_tail()}"
            )
        try:
            answer: dict[str, Any] = json.loads(reply[0])
        except json.JSONDecodeError:
            raise TransportError(
                f"device {self.device_name}: the agent sent a line that is not JSON: "
                f"{reply[0][:200]!r}"
            ) from None
        return answer

    def close(self, timeout: float = 15.0) -> None:
        """Ask the agent to quit (it sends no reply) and wait; kill it at the deadline."""
        assert self.process.stdin is not None
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("device %s: agent (PID %d) killed", self.device_name, self.process.pid)
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
