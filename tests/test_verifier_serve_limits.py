"""``device-sdk verifier serve`` under uvicorn: proxy headers, idle connections, disconnects."""

from __future__ import annotations

import argparse
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fixtures_services import HOST, HTTPServer, UvicornFactory, free_port, wait_until
from fixtures_verifier import ManualClock, make_verifier

from device_sdk.cli.main import build_parser
from device_sdk.cli.verifier import (
    DEFAULT_LIMIT_CONCURRENCY,
    KEEP_ALIVE_TIMEOUT_S,
    uvicorn_settings,
)
from device_sdk.errors import ConfigError
from device_sdk.verifier.app import create_app

SPOOFED = "203.0.113.99"
# A well-formed device id that is not enrolled, so the challenge request is rejected and audited.
UNKNOWN_DEVICE = "A" * 43


def serve_args(*options: str) -> argparse.Namespace:
    return build_parser().parse_args(["verifier", "serve", "--db", "v.db", *options])


def serve(factory: UvicornFactory, tmp_path: Path, *extra: str) -> HTTPServer:
    port = free_port()
    argv = [
        sys.executable, "-m", "device_sdk", "verifier", "serve", "--db",
        str(tmp_path / "verifier.db"), "--host", HOST, "--port", str(port),
        "--log-level", "warning", *extra,
    ]
    return factory.command(argv, port=port, name=f"verifier:{port}")


def audited_client(server: HTTPServer) -> str:
    """Request a challenge with a spoofed X-Forwarded-For; return the audit line's client."""
    response = httpx.post(
        server.url + "/v1/challenges",
        json={"device_id": UNKNOWN_DEVICE, "audience": server.url},
        headers={"X-Forwarded-For": SPOOFED},
        timeout=10,
    )
    assert response.status_code == 401

    lines: list[str] = []

    def audit_line_written() -> bool:
        text = server.process.log_path.read_text(errors="replace")
        lines[:] = [line for line in text.splitlines() if "event=challenge" in line]
        return bool(lines)

    wait_until(audit_line_written, timeout=10, what="the challenge audit line")
    [line] = lines
    [client] = [field for field in line.split() if field.startswith("client=")]
    return client.removeprefix("client=")


def test_forwarded_for_ignored_by_default(
    uvicorn_factory: UvicornFactory, tmp_path: Path
) -> None:
    server = serve(uvicorn_factory, tmp_path)

    assert audited_client(server) == HOST


def test_forwarded_for_from_trusted_proxy(
    uvicorn_factory: UvicornFactory, tmp_path: Path
) -> None:
    server = serve(uvicorn_factory, tmp_path, "--forwarded-allow-ips", HOST)

    assert audited_client(server) == SPOOFED


def test_idle_connection_closed(uvicorn_factory: UvicornFactory, tmp_path: Path) -> None:
    server = serve(uvicorn_factory, tmp_path)
    with socket.create_connection((HOST, server.port), timeout=KEEP_ALIVE_TIMEOUT_S + 10) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: verifier\r\n\r\n")
        response = b""
        while not response.endswith(b'{"status":"ok"}'):
            response += conn.recv(65536)
        started = time.monotonic()
        rest = conn.recv(65536)
        idle = time.monotonic() - started

    assert response.startswith(b"HTTP/1.1 200 ")
    assert rest == b""
    assert KEEP_ALIVE_TIMEOUT_S - 1 <= idle <= KEEP_ALIVE_TIMEOUT_S + 5


def test_uvicorn_settings_default() -> None:
    settings = uvicorn_settings(serve_args())

    assert settings["proxy_headers"] is False
    assert settings["forwarded_allow_ips"] is None
    assert settings["limit_concurrency"] == DEFAULT_LIMIT_CONCURRENCY
    assert settings["timeout_keep_alive"] == KEEP_ALIVE_TIMEOUT_S


def test_uvicorn_settings_with_proxies() -> None:
    settings = uvicorn_settings(serve_args("--forwarded-allow-ips", "10.0.0.5,10.0.0.6"))

    assert settings["proxy_headers"] is True
    assert settings["forwarded_allow_ips"] == "10.0.0.5,10.0.0.6"


def test_limit_concurrency_validated() -> None:
    with pytest.raises(ConfigError, match="--limit-concurrency must be at least 1, got 0"):
        uvicorn_settings(serve_args("--limit-concurrency", "0"))


# A client that leaves mid-body


@pytest.fixture
def threaded_server(tmp_path: Path) -> Iterator[int]:
    """Serve the app with uvicorn in a thread of this process, so caplog captures its logs."""
    verifier = make_verifier(tmp_path, ManualClock())
    port = free_port()
    config = uvicorn.Config(
        create_app(verifier), host=HOST, port=port, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=10, what="uvicorn in a thread")
    yield port
    server.should_exit = True
    thread.join(timeout=10)
    verifier.close()


def test_disconnect_mid_body_logs_one_line(
    threaded_server: int, caplog: pytest.LogCaptureFixture
) -> None:
    request = (
        b"POST /v1/token HTTP/1.1\r\nHost: verifier\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n" + b'{"assertion": "'
    )
    with caplog.at_level(logging.INFO):
        with socket.create_connection((HOST, threaded_server), timeout=10) as conn:
            conn.sendall(request)

        def disconnect_logged() -> bool:
            return any("disconnected after" in r.getMessage() for r in caplog.records)

        wait_until(disconnect_logged, timeout=10, what="the disconnect log line")

    [line] = [r for r in caplog.records if "disconnected after" in r.getMessage()]
    assert line.levelno == logging.INFO
    assert line.name == "device_sdk.verifier.app"
    # The app reads the 15 bytes sent, or none if uvicorn saw the close first.
    assert re.fullmatch(
        r"client 127\.0\.0\.1 disconnected after (0|15) bytes of the body of POST /v1/token",
        line.getMessage(),
    )
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [r for r in caplog.records if r.exc_info] == []


def test_no_rate_limits_covers_addresses() -> None:
    from device_sdk.cli.verifier import build_config

    config = build_config(serve_args("--no-rate-limits"))

    assert config.failure_limit_per_address is None
    assert build_config(serve_args()).failure_limit_per_address is not None
