"""Child process supervision for ``device-sdk demo``: start, wait until ready, stop every one.

Each child runs in its own session (process group), so stopping it also stops anything it
started. On Linux each child also sets PR_SET_PDEATHSIG, so the kernel sends it SIGTERM when the
supervising process dies, even by SIGKILL. SIGINT, SIGTERM and SIGHUP all end in the same
shutdown path.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.05
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ChildFailedError(RuntimeError):
    """A child process exited early or did not become ready in time."""


def free_loopback_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now.

    Another process can take the port before the caller binds it; callers poll readiness and
    report a clear error in that rare case.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _prepare_child() -> None:
    # Runs in the child between fork and exec. The parent blocks the shutdown signals around
    # fork, and exec keeps the signal mask, so the child unblocks them first.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)
    # PR_SET_PDEATHSIG is Linux-only; elsewhere the explicit shutdown is the only protection.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """A started child process and the file its output goes to."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, max_chars: int = 2000) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-max_chars:]


class Supervisor:
    """Starts child processes and guarantees they are stopped when the ``with`` block ends.

    Inside the block, SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, so one ``finally``
    path stops every child whatever signal arrived. Python drops an exception raised inside a
    fork hook ("Exception ignored in ..."), so the handler also records the signal and every
    method here, and :meth:`check_interrupted`, raises KeyboardInterrupt again until the block
    ends. During shutdown these signals are ignored, so a second Ctrl-C cannot cut it short.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.interrupted_by: int | None = None
        self._previous_handlers: dict[int, object] = {}

    def __enter__(self) -> Supervisor:
        for signum in SHUTDOWN_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._raise_interrupt)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _raise_interrupt(self, signum: int, frame: FrameType | None) -> None:
        self.interrupted_by = signum
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def check_interrupted(self) -> None:
        """Raise KeyboardInterrupt if a shutdown signal arrived inside the block."""
        if self.interrupted_by is not None:
            raise KeyboardInterrupt(f"signal {signal.Signals(self.interrupted_by).name}")

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        """Start a child with its output in ``<log_dir>/<name>.log``.

        The shutdown signals are blocked until the child is recorded, so an interrupt can never
        leave an untracked child behind.
        """
        self.check_interrupted()
        log_path = self.log_dir / f"{name}.log"
        log_file: IO[bytes]
        with _signals_blocked(), open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_prepare_child,  # the demo starts children before any thread
            )
            child = Child(name=name, process=process, log_path=log_path)
            self.children.append(child)
        logger.info("started %s (PID %d): %s", name, process.pid, " ".join(argv))
        return child

    def run(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        on_start: Callable[[Child], None] | None = None,
    ) -> tuple[int, str]:
        """Run a child to completion and return its exit status and output.

        ``on_start`` is called with the child once it runs. The child is stopped like the others
        if the block is interrupted meanwhile.
        """
        child = self.start(name, argv, env=env)
        if on_start is not None:
            on_start(child)
        deadline = time.monotonic() + timeout
        while child.process.poll() is None:
            self.check_interrupted()
            if time.monotonic() > deadline:
                self.stop(child)
                raise ChildFailedError(
                    f"{name} did not finish within {timeout:.0f} s; output:\n{child.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)
        status = child.process.returncode
        self.children.remove(child)
        return status, child.log_tail(max_chars=100_000)

    def wait_until(
        self,
        child: Child,
        ready: Callable[[], bool],
        *,
        timeout: float,
        what: str,
    ) -> float:
        """Poll ``ready()`` until it returns True; return the seconds it took.

        Raises ChildFailedError when the child exits first or the deadline passes, with the tail
        of its output.
        """
        started = time.monotonic()
        deadline = started + timeout
        while True:
            self.check_interrupted()
            if child.process.poll() is not None:
                raise ChildFailedError(
                    f"{child.name} exited with status {child.process.returncode} before "
                    f"{what}; output:\n{child.log_tail()}"
                )
            if ready():
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise ChildFailedError(
                    f"{child.name} was not ready ({what}) after {timeout:.0f} s; "
                    f"output:\n{child.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def stop(self, child: Child) -> None:
        """Stop one child's process group: SIGTERM, then SIGKILL after a grace period."""
        process = child.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s (PID %d) ignored SIGTERM; sending SIGKILL", child.name, child.pid
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # The group may hold processes the child started even after the child itself exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        if child in self.children:
            self.children.remove(child)
        logger.info("stopped %s (PID %d)", child.name, child.pid)

    def stop_all(self) -> None:
        """Stop every child, newest first, with SIGINT, SIGTERM and SIGHUP ignored meanwhile."""
        with _signals_ignored(SHUTDOWN_SIGNALS):
            for child in reversed(list(self.children)):
                self.stop(child)

    @property
    def pids(self) -> list[int]:
        return [child.pid for child in self.children]


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
    try:
        yield
    finally:
        # A signal that arrived meanwhile is delivered here, once the child is recorded.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)


@contextlib.contextmanager
def _signals_ignored(signums: Sequence[int]) -> Iterator[None]:
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    """Return True when a TCP connect to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
