"""Real servers for integration tests: Redis, Mosquitto, RabbitMQ, PostgreSQL and uvicorn.

Each server listens on 127.0.0.1 on a free port, keeps its state in a temporary directory, runs
in its own process group and is stopped by PID when the fixture ends. Readiness is polled against
a deadline. A missing binary skips the test with the Debian install command in the reason, and
``tests/conftest.py`` turns that skip into a failure under ``DEVICE_SDK_REQUIRE_SERVICES=1``.

Fixtures:

- ``redis_server`` (session) and ``redis_client`` (function, flushed before each test)
- ``mosquitto`` (function): a :class:`Mosquitto` broker that can be reconfigured and restarted
- ``rabbitmq_factory`` (session): ``rabbitmq_factory(auth_base_url)`` returns a running
  :class:`RabbitMQ` whose MQTT logins go to the HTTP auth backend at that URL
- ``postgres_server`` (session): a :class:`Postgres` cluster with trust authentication, and
  ``postgres_database`` (function): the URL of a new database on it for one test
- ``test_pki`` (session): a :class:`TestPKI` with a CA, a server certificate for
  127.0.0.1/localhost and a second, different certificate from the same CA
- ``uvicorn_factory`` (function): starts an ASGI app or any HTTP server command and waits for it
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Generous deadlines: the machine has 2 cores shared by every test run on it.
START_TIMEOUT = 30.0
RABBITMQ_START_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0
POLL_INTERVAL = 0.05


# ---------------------------------------------------------------------------------------------
# Processes, ports and readiness


_handed_out_ports: set[int] = set()


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # the Linux default


def _port_is_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now, never the same one twice.

    The port lies below the kernel's ephemeral range (``net.ipv4.ip_local_port_range``): a port
    from that range can be taken as the local port of an outgoing connection between this check
    and the server's bind, which then fails with "address already in use".
    """
    low, _high = _ephemeral_port_range()
    first, last = 10000, low - 1
    if last - first < 1000:
        first, last = 1024, low - 1
    generator = random.SystemRandom()
    for _ in range(500):
        port = generator.randint(first, last)
        if port not in _handed_out_ports and _port_is_bindable(port):
            _handed_out_ports.add(port)
            return port
    raise RuntimeError(f"no free TCP port found on {HOST} between {first} and {last}")


def require_binary(name: str, package: str, *, search: Sequence[str] = ()) -> str:
    """Return the path of an executable, or skip the test with the command that installs it."""
    path = shutil.which(name)
    if path is None:
        for directory in search:
            candidate = Path(directory) / name
            if os.access(candidate, os.X_OK):
                path = str(candidate)
                break
    if path is None:
        pytest.skip(
            f"{name} not found; install it with: sudo apt-get install -y {package}"
        )
    return path


def wait_until(
    probe: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    process: ServerProcess | None = None,
    retry_on: tuple[type[Exception], ...] = (OSError,),
) -> None:
    """Poll ``probe`` until it returns True, or raise with the server's log after ``timeout`` s.

    A probe that raises one of ``retry_on`` counts as "not yet". If ``process`` exits first, the
    wait stops at once and the error shows its log.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        if process is not None and process.exited():
            raise RuntimeError(
                f"{what}: exited with status {process.returncode} before it was ready\n"
                f"{process.log_tail()}"
            )
        try:
            if probe():
                return
        except retry_on as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            log = process.log_tail() if process is not None else ""
            raise TimeoutError(
                f"{what}: not ready after {timeout:.0f} s (last error: {last_error})\n{log}"
            )
        time.sleep(POLL_INTERVAL)


def tcp_accepts(port: int, host: str = HOST) -> bool:
    with socket.create_connection((host, port), timeout=1.0):
        return True


def mqtt_connack(port: int, host: str = HOST) -> bool:
    """Send an anonymous MQTT 3.1.1 CONNECT and report whether any CONNACK came back.

    A CONNACK that refuses the login still proves the broker is serving MQTT.
    """
    client_id = b"readiness-probe"
    variable_header = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol 3.1.1, clean session, 10 s
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = variable_header + payload
    packet = b"\x10" + bytes([len(body)]) + body
    with socket.create_connection((host, port), timeout=5.0) as sock:
        sock.sendall(packet)
        answer = sock.recv(4)
    return len(answer) >= 2 and answer[0] == 0x20


@dataclass
class ServerProcess:
    """A server started in its own process group, its output sent to a log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    user: str | None = None
    stop_signal: int = signal.SIGTERM
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        try:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                user=self.user,
                start_new_session=True,
            )
        finally:
            log.close()

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def stop(self) -> None:
        """Signal the process group, wait, and kill it if it outlives the deadline."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, self.stop_signal)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT)
        # Children that stayed in the group (workers, helpers) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"({self.name} log {self.log_path} unreadable)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last lines of {self.log_path} ---\n{tail}"


def make_service_dir(prefix: str, *, owner: str | None = None) -> Path:
    """Create a temporary directory under /tmp that a service user can reach.

    pytest's own temporary directories sit below a mode 0700 parent, which a server that drops
    privileges (Mosquitto, PostgreSQL) cannot traverse.
    """
    path = Path(tempfile.mkdtemp(prefix=f"device-sdk-{prefix}-"))
    path.chmod(0o755)
    if owner is not None and os.geteuid() == 0:
        entry = pwd.getpwnam(owner)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def give_to_user(path: Path, user: str, mode: int) -> None:
    """Set a file's mode, and its owner when running as root, so that ``user`` can read it."""
    path.chmod(mode)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


# ---------------------------------------------------------------------------------------------
# Redis


@dataclass
class RedisServer:
    port: int
    directory: Path
    process: ServerProcess

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A Redis server with persistence off, for the whole session."""
    binary = require_binary("redis-server", "redis-server")
    import redis

    directory = make_service_dir("redis")
    port = free_port()
    argv = [
        binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
        "--dir", str(directory), "--protected-mode", "yes",
    ]
    process = ServerProcess("redis-server", argv, directory / "redis.log")
    process.start()
    try:
        client = redis.Redis(host=HOST, port=port, socket_timeout=2.0)
        wait_until(
            lambda: bool(client.ping()),
            timeout=START_TIMEOUT,
            what=f"redis-server on port {port}",
            process=process,
            retry_on=(OSError, redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError),
        )
        client.close()
        yield RedisServer(port, directory, process)
    finally:
        process.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[Any]:
    """A ``redis.Redis`` client on an emptied database."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


# ---------------------------------------------------------------------------------------------
# Mosquitto


class Mosquitto:
    """A Mosquitto 2.0 broker with its own config file, restartable with more config.

    Mosquitto drops privileges to the ``mosquitto`` user when started as root, so every file it
    reads after start-up (password file, certificates, plugins) must be readable by that user:
    :meth:`add_file` copies a file into the broker's directory with that owner.
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.extra_config: list[str] = []
        self.extra_ports: list[int] = []
        self.config_path = directory / "mosquitto.conf"
        self.process: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    def add_file(self, name: str, content: bytes, *, mode: int = 0o600) -> Path:
        path = self.directory / name
        path.write_bytes(content)
        give_to_user(path, "mosquitto", mode)
        return path

    def set_password_file(self, users: dict[str, str]) -> Path:
        """Write a hashed password file for ``users`` and require logins from now on.

        The passwords reach ``mosquitto_passwd -U`` through a file, never its command line.
        Takes effect at the next :meth:`restart`.
        """
        tool = require_binary("mosquitto_passwd", "mosquitto")
        plain = "".join(f"{user}:{password}\n" for user, password in users.items())
        path = self.add_file("passwords", plain.encode())
        subprocess.run([tool, "-U", str(path)], check=True, capture_output=True, timeout=30)
        give_to_user(path, "mosquitto", 0o600)
        self.extra_config += ["allow_anonymous false", f"password_file {path}"]
        return path

    def add_plugin(self, plugin_path: Path, options: dict[str, str] | None = None) -> None:
        """Load a plugin with ``plugin_opt_*`` options, from the next restart on."""
        self.extra_config.append(f"plugin {plugin_path}")
        for key, value in (options or {}).items():
            self.extra_config.append(f"plugin_opt_{key} {value}")

    def add_tls_listener(
        self,
        cert_pem: bytes,
        key_pem: bytes,
        *,
        ca_pem: bytes | None = None,
        require_certificate: bool = False,
    ) -> int:
        """Add a TLS listener on a new free port, from the next restart on, and return the port."""
        port = free_port()
        cert = self.add_file(f"listener-{port}.crt", cert_pem, mode=0o644)
        key = self.add_file(f"listener-{port}.key", key_pem, mode=0o600)
        lines = [f"listener {port} {HOST}", f"certfile {cert}", f"keyfile {key}"]
        if ca_pem is not None:
            ca = self.add_file(f"listener-{port}-ca.crt", ca_pem, mode=0o644)
            lines.append(f"cafile {ca}")
        if require_certificate:
            lines += ["require_certificate true", "use_identity_as_username true"]
        self.extra_config += lines
        self.extra_ports.append(port)
        return port

    def write_config(self) -> None:
        # Global options come first: Mosquitto applies listener options to the listener above.
        lines = [
            "per_listener_settings false",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "set_tcp_nodelay true",
        ]
        if not any(line.startswith("allow_anonymous") for line in self.extra_config):
            lines.append("allow_anonymous true")
        # Lines from the first extra "listener" on belong to that listener, so they go last.
        global_lines, listener_blocks = _split_listener_blocks(self.extra_config)
        listeners = [f"listener {self.port} {HOST}"]
        text = "\n".join(lines + global_lines + listeners + listener_blocks) + "\n"
        self.config_path.write_text(text)
        give_to_user(self.config_path, "mosquitto", 0o644)

    def start(self) -> None:
        self.write_config()
        self.process = ServerProcess(
            "mosquitto",
            [self.binary, "-c", str(self.config_path)],
            self.directory / "mosquitto.log",
        )
        self.process.start()
        wait_until(
            lambda: mqtt_connack(self.port),
            timeout=START_TIMEOUT,
            what=f"mosquitto on port {self.port}",
            process=self.process,
        )
        for port in self.extra_ports:
            wait_until(
                lambda port=port: tcp_accepts(port),  # type: ignore[misc]
                timeout=START_TIMEOUT,
                what=f"mosquitto TLS listener on port {port}",
                process=self.process,
            )

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def restart(self) -> None:
        """Stop and start again on the same ports with the config as it is now."""
        self.stop()
        self.start()

    def log_tail(self) -> str:
        return self.process.log_tail() if self.process is not None else ""


def _split_listener_blocks(lines: list[str]) -> tuple[list[str], list[str]]:
    """Split config lines into global lines and lines from the first ``listener`` on."""
    for index, line in enumerate(lines):
        if line.startswith("listener "):
            return lines[:index], lines[index:]
    return list(lines), []


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    """A running Mosquitto broker that allows anonymous logins until its config changes."""
    binary = require_binary("mosquitto", "mosquitto", search=["/usr/sbin"])
    directory = make_service_dir("mosquitto")
    broker = Mosquitto(binary, directory)
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# RabbitMQ

RABBITMQ_SBIN = "/usr/lib/rabbitmq/bin"


class RabbitMQ:
    """A RabbitMQ 3.10 node with MQTT whose logins go to an HTTP auth backend.

    The node gets its own Erlang port mapper (epmd) on a free port, started here, so its name
    cannot clash with another node on the machine and both processes are stopped by PID.
    RabbitMQ's MQTT plugin speaks MQTT 3.1.1 only.
    """

    def __init__(self, auth_base_url: str, directory: Path) -> None:
        self.auth_base_url = auth_base_url.rstrip("/")
        self.directory = directory
        self.mqtt_port = free_port()
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node_name = f"rabbit-{self.mqtt_port}@localhost"
        self.epmd: ServerProcess | None = None
        self.server: ServerProcess | None = None
        self._write_files()

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{HOST}:{self.mqtt_port}"

    def _write_files(self) -> None:
        (self.directory / "home").mkdir(exist_ok=True)
        (self.directory / "mnesia").mkdir(exist_ok=True)
        (self.directory / "log").mkdir(exist_ok=True)
        (self.directory / "enabled_plugins").write_text(
            "[rabbitmq_mqtt,rabbitmq_auth_backend_http].\n"
        )
        base = self.auth_base_url
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {HOST}:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = {HOST}:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = false\n"
            "mqtt.vhost = /\n"
            "mqtt.exchange = amq.topic\n"
            "auth_backends.1 = http\n"
            "auth_http.http_method = post\n"
            f"auth_http.user_path = {base}/user\n"
            f"auth_http.vhost_path = {base}/vhost\n"
            f"auth_http.resource_path = {base}/resource\n"
            f"auth_http.topic_path = {base}/topic\n"
            "log.console = true\n"
            "log.console.level = info\n"
            "log.file = false\n"
        )

    def environment(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if key in ("PATH", "LANG", "LC_ALL", "TMPDIR")
        }
        env.update(
            HOME=str(self.directory / "home"),
            RABBITMQ_NODENAME=self.node_name,
            RABBITMQ_CONFIG_FILE=str(self.directory / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.directory / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.directory / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.directory / "log"),
            RABBITMQ_NODE_IP_ADDRESS=HOST,
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_ADDRESS=HOST,
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def start(self) -> None:
        env = self.environment()
        epmd = require_binary("epmd", "erlang-base", search=["/usr/lib/erlang/bin"])
        self.epmd = ServerProcess(
            "epmd",
            [epmd, "-port", str(self.epmd_port), "-address", HOST],
            self.directory / "epmd.log",
            env=env,
        )
        self.epmd.start()
        wait_until(
            lambda: tcp_accepts(self.epmd_port),
            timeout=START_TIMEOUT,
            what=f"epmd on port {self.epmd_port}",
            process=self.epmd,
        )

        self.server = ServerProcess(
            "rabbitmq-server",
            [f"{RABBITMQ_SBIN}/rabbitmq-server"],
            self.directory / "rabbitmq.log",
            env=env,
            cwd=self.directory,
        )
        self.server.start()
        wait_until(
            lambda: mqtt_connack(self.mqtt_port),
            timeout=RABBITMQ_START_TIMEOUT,
            what=f"RabbitMQ MQTT listener on port {self.mqtt_port}",
            process=self.server,
        )

    def stop(self) -> None:
        """Stop the node (beam.smp and its helpers), then its epmd, by PID."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.epmd is not None:
            self.epmd.stop()
            self.epmd = None

    def restart(self) -> None:
        """Stop and start again on the same ports with the same data directory."""
        self.stop()
        self.start()

    def log_tail(self) -> str:
        return self.server.log_tail() if self.server is not None else ""


@pytest.fixture(scope="session")
def rabbitmq_factory() -> Iterator[Callable[[str], RabbitMQ]]:
    """Return ``start(auth_base_url)``, which starts a RabbitMQ node for that HTTP auth backend.

    ``auth_base_url`` is the prefix of the four webhook paths, for example
    ``http://127.0.0.1:8080/v1/broker/auth/rabbitmq``. Nodes are kept per URL for the session
    (a start costs about 9 s) and stopped at its end.
    """
    require_binary("rabbitmq-server", "rabbitmq-server", search=[RABBITMQ_SBIN])
    nodes: dict[str, RabbitMQ] = {}
    directories: list[Path] = []

    def start(auth_base_url: str) -> RabbitMQ:
        node = nodes.get(auth_base_url)
        if node is not None and node.server is not None and not node.server.exited():
            return node
        directory = make_service_dir("rabbitmq")
        directories.append(directory)
        node = RabbitMQ(auth_base_url, directory)
        nodes[auth_base_url] = node
        node.start()
        return node

    try:
        yield start
    finally:
        for node in nodes.values():
            node.stop()
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# PostgreSQL


@dataclass
class Postgres:
    port: int
    directory: Path
    user: str
    process: ServerProcess
    bin_dir: Path

    @property
    def dsn(self) -> str:
        return f"host={HOST} port={self.port} user={self.user} dbname=postgres"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{HOST}:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://{self.user}@{HOST}:{self.port}/{name}"

    def wait_ready(self) -> None:
        pg_isready = str(self.bin_dir / "pg_isready")
        wait_until(
            lambda: subprocess.run(
                [pg_isready, "-h", HOST, "-p", str(self.port), "-U", self.user, "-q"],
                timeout=10,
                check=False,
            ).returncode == 0,
            timeout=START_TIMEOUT,
            what=f"postgres on port {self.port}",
            process=self.process,
        )

    def restart(self) -> None:
        """Stop the server (a fast shutdown, which drops every client) and start it again."""
        self.process.stop()
        self.process.start()
        self.wait_ready()


def _postgres_bin_dir() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    return candidates[0].parent if candidates else None


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """Run a PostgreSQL cluster in a temporary directory with trust authentication on loopback.

    ``initdb`` and ``postgres`` refuse to run as root, so as root they run as the ``postgres``
    user. The server runs in the foreground (not through ``pg_ctl``) so the fixture owns its PID.
    """
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL not found; install it with: sudo apt-get install -y postgresql")
    run_as = "postgres" if os.geteuid() == 0 else None
    db_user = run_as or pwd.getpwuid(os.geteuid()).pw_name

    directory = make_service_dir("postgres", owner=run_as)
    data = directory / "data"
    port = free_port()
    subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", db_user, "--auth=trust",
         "--encoding=UTF8", "--locale=C", "--no-sync"],
        check=True,
        capture_output=True,
        timeout=120,
        user=run_as,
        cwd=directory,
    )
    argv = [
        str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
        "-c", f"listen_addresses={HOST}", "-c", f"unix_socket_directories={directory}",
        "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
    ]
    # SIGINT requests a PostgreSQL fast shutdown, which disconnects clients without waiting.
    process = ServerProcess(
        "postgres", argv, directory / "postgres.log", user=run_as, cwd=directory,
        stop_signal=signal.SIGINT,
    )
    # The log file must be writable by the server user.
    (directory / "postgres.log").touch()
    if run_as is not None:
        give_to_user(directory / "postgres.log", run_as, 0o644)
    process.start()
    try:
        server = Postgres(port, directory, db_user, process, bin_dir)
        server.wait_ready()
        yield server
    finally:
        process.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """A PostgreSQL cluster for the whole session; see :func:`running_postgres`."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_database(postgres_server: Postgres) -> Iterator[str]:
    """The URL of a new, empty database on ``postgres_server``, dropped when the test ends."""
    import psycopg

    name = f"test_{secrets.token_hex(8)}"
    with psycopg.connect(postgres_server.dsn, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield postgres_server.database_url(name)
    with psycopg.connect(postgres_server.dsn, autocommit=True, connect_timeout=10) as admin:
        # FORCE ends the connections that a failed test left open.
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# ---------------------------------------------------------------------------------------------
# Test PKI


@dataclass
class CertifiedKey:
    """A certificate and its private key, as PEM bytes and as files."""

    cert_pem: bytes
    key_pem: bytes
    cert_path: Path
    key_path: Path

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


@dataclass
class TestPKI:
    """A test CA, a server certificate for 127.0.0.1 and localhost, and a second one.

    ``other_server`` has the same names and CA but a different key and serial, so a client that
    trusts the CA accepts it while its ``tls-server-end-point`` hash differs: the certificate a
    TLS-intercepting proxy would present.
    """

    __test__ = False  # not a test class, despite the name

    ca: CertifiedKey
    server: CertifiedKey
    other_server: CertifiedKey
    directory: Path

    def client_ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca.cert_path))


def _write_pem(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def make_ca(directory: Path, name: str = "device-sdk test CA") -> tuple[CertifiedKey, Any]:
    """Create a self-signed P-256 CA valid for a day. Returns it and its private key object."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    certified = _certified_files(directory, "ca", cert, key)
    return certified, key


def issue_server_certificate(
    directory: Path,
    stem: str,
    ca_cert: x509.Certificate,
    ca_key: Any,
    *,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = (HOST,),
) -> CertifiedKey:
    """Issue a P-256 TLS server certificate from the CA and write ``stem``.crt/.key."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _certified_files(directory, stem, cert, key)


def _certified_files(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> CertifiedKey:
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_path = _write_pem(directory / f"{stem}.crt", cert_pem, 0o644)
    key_path = _write_pem(directory / f"{stem}.key", key_pem, 0o600)
    return CertifiedKey(cert_pem, key_pem, cert_path, key_path)


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    directory = tmp_path_factory.mktemp("pki")
    ca, ca_key = make_ca(directory)
    server = issue_server_certificate(directory, "server", ca.certificate, ca_key)
    other = issue_server_certificate(directory, "other-server", ca.certificate, ca_key)
    return TestPKI(ca=ca, server=server, other_server=other, directory=directory)


# ---------------------------------------------------------------------------------------------
# uvicorn and other HTTP servers


@dataclass
class HTTPServer:
    """An HTTP(S) server process on 127.0.0.1 and the base URL to reach it."""

    port: int
    scheme: str
    process: ServerProcess
    health_path: str
    ca_path: Path | None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.port}"

    def stop(self) -> None:
        self.process.stop()

    def start(self) -> None:
        """Start the same command again (after :meth:`stop`) and wait until it responds."""
        self.process.start()
        self.wait_ready()

    def wait_ready(self) -> None:
        context = None
        if self.scheme == "https":
            context = ssl.create_default_context(
                cafile=str(self.ca_path) if self.ca_path else None
            )
        wait_until(
            lambda: http_answers(self.url + self.health_path, context),
            timeout=START_TIMEOUT,
            what=f"{self.process.name} at {self.url}",
            process=self.process,
        )


def http_answers(url: str, context: ssl.SSLContext | None) -> bool:
    """Return True once ``url`` returns any HTTP status. Connection errors count as not yet."""
    try:
        with urllib.request.urlopen(url, timeout=2.0, context=context) as response:  # noqa: S310
            return response.status > 0
    except urllib.error.HTTPError:
        return True
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from exc


@dataclass
class UvicornFactory:
    """Start HTTP servers for a test; each one is stopped when the test ends."""

    directory: Path
    servers: list[HTTPServer] = field(default_factory=list)

    def app(
        self,
        target: str,
        *,
        factory: bool = True,
        tls: CertifiedKey | None = None,
        ca_path: Path | None = None,
        env: dict[str, str] | None = None,
        health_path: str = "/healthz",
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> HTTPServer:
        """Serve ``module:attribute`` with ``python -m uvicorn``, over TLS when ``tls`` is given."""
        port = port or free_port()
        argv = [sys.executable, "-m", "uvicorn", target, "--host", HOST, "--port", str(port),
                "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "2"]
        if factory:
            argv.append("--factory")
        if tls is not None:
            argv += ["--ssl-certfile", str(tls.cert_path), "--ssl-keyfile", str(tls.key_path)]
        argv += list(extra_args)
        return self.command(
            argv,
            port=port,
            scheme="https" if tls else "http",
            ca_path=ca_path,
            env=env,
            health_path=health_path,
            name=f"uvicorn {target}",
        )

    def command(
        self,
        argv: Sequence[str],
        *,
        port: int,
        scheme: str = "http",
        ca_path: Path | None = None,
        env: dict[str, str] | None = None,
        health_path: str = "/healthz",
        name: str | None = None,
    ) -> HTTPServer:
        """Run any server command (``device-sdk verifier serve ...``) that listens on ``port``."""
        full_env = dict(os.environ)
        python_path = [str(REPO_ROOT), str(REPO_ROOT / "tests")]
        if full_env.get("PYTHONPATH"):
            python_path.append(full_env["PYTHONPATH"])
        full_env["PYTHONPATH"] = os.pathsep.join(python_path)
        full_env.update(env or {})
        label = name or Path(argv[0]).name
        process = ServerProcess(
            label,
            list(argv),
            self.directory / f"server-{port}.log",
            env=full_env,
            cwd=self.directory,
            stop_signal=signal.SIGINT,
        )
        server = HTTPServer(port, scheme, process, health_path, ca_path)
        self.servers.append(server)
        process.start()
        server.wait_ready()
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def uvicorn_factory(tmp_path: Path) -> Iterator[UvicornFactory]:
    factory = UvicornFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


def create_sample_app() -> Callable[..., Any]:
    """Return a minimal ASGI app (``GET /healthz`` returns ``ok``) for testing uvicorn_factory."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        status = 200 if scope["path"] == "/healthz" else 404
        body = b"ok" if status == 200 else b"not found"
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain")],
        })
        await send({"type": "http.response.body", "body": body})

    return app
