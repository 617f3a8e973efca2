"""``device-sdk verifier serve`` options turned into a VerifierConfig, and their errors."""

from __future__ import annotations

import argparse
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fixtures_services import TestPKI, free_port
from fixtures_verifier import enroll, verifier_config

from device_sdk.auth import tls_server_end_point
from device_sdk.cli.main import build_parser
from device_sdk.cli.main import main as cli_main
from device_sdk.cli.verifier import build_config
from device_sdk.errors import ConfigError
from device_sdk.verifier import Verifier


def serve_args(*options: str) -> argparse.Namespace:
    return build_parser().parse_args(["verifier", "serve", "--db", "v.db", *options])


def end_point(certificate_pem: bytes) -> bytes:
    der = x509.load_pem_x509_certificate(certificate_pem).public_bytes(serialization.Encoding.DER)
    return tls_server_end_point(der)


def test_default_issuer_is_listen_url() -> None:
    config = build_config(serve_args("--port", "9000"))

    assert config.issuer == "http://127.0.0.1:9000"
    assert config.http_channel_bindings == frozenset()
    assert dict(config.broker_audiences) == {}
    assert config.challenge_limit_per_device is not None


def test_tls_issuer_binds_served_certificates(test_pki: TestPKI) -> None:
    config = build_config(serve_args(
        "--port", "9443",
        "--tls-cert", str(test_pki.server.cert_path),
        "--tls-key", str(test_pki.server.key_path),
        "--issuer-cert", str(test_pki.other_server.cert_path),
    ))

    assert config.issuer == "https://127.0.0.1:9443"
    assert config.http_channel_bindings == {
        end_point(test_pki.server.cert_pem),
        end_point(test_pki.other_server.cert_pem),
    }


def test_broker_audiences_and_certificates(test_pki: TestPKI) -> None:
    config = build_config(serve_args(
        "--broker-audience", "mqtt://127.0.0.1:1883",
        "--broker-audience", "mqtts://127.0.0.1:8883",
        "--broker-cert", "mqtts://127.0.0.1:8883", str(test_pki.server.cert_path),
        "--nonceless-audience", "mqtt://127.0.0.1:1883",
        "--challenge-lifetime", "30",
        "--no-rate-limits",
    ))

    assert dict(config.broker_audiences) == {
        "mqtt://127.0.0.1:1883": frozenset(),
        "mqtts://127.0.0.1:8883": frozenset({end_point(test_pki.server.cert_pem)}),
    }
    assert config.nonceless_audiences == {"mqtt://127.0.0.1:1883"}
    assert config.challenge_lifetime == 30
    assert config.challenge_limit_per_device is None
    assert config.challenge_limit_per_address is None
    assert config.failure_limit_per_device is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--issuer", "https://verifier.example"], "needs the certificates clients see"),
        (["--broker-cert", "mqtts://b:8883", "x.pem"], "not --broker-audience URLs"),
        (["--broker-audience", "mqtts://b:8883"], "no certificate hashes are configured"),
        (["--issuer-cert", "/nonexistent.pem", "--issuer", "https://v"], "/nonexistent.pem"),
        (["--challenge-lifetime", "500"], "challenge lifetime 500 s is outside"),
        (["--broker-audience", "broker-without-scheme"], "is not an absolute URL"),
    ],
)
def test_invalid_serve_options(options: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build_config(serve_args(*options))

    assert message in str(raised.value)


def test_serve_port_in_use_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        status = cli_main(
            ["verifier", "serve", "--db", str(tmp_path / "v.db"), "--port", str(port)]
        )

    error = capsys.readouterr().err
    assert status == 1
    assert error == (
        f"device-sdk: error: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "pick another --port or stop the process that uses it\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def library_log_level() -> Iterator[None]:
    """Restore the level of the device_sdk logger, which ``serve`` sets for its process."""
    logger = logging.getLogger("device_sdk")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.mark.usefixtures("library_log_level")
def test_serve_redis_down_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    redis_port = free_port()
    status = cli_main([
        "verifier", "serve", "--db", str(tmp_path / "v.db"), "--port", str(free_port()),
        "--redis", f"redis://127.0.0.1:{redis_port}/0",
    ])

    error = capsys.readouterr().err
    assert status == 1
    assert error.startswith(f"device-sdk: error: Redis at 127.0.0.1:{redis_port}/0 failed: ")
    assert error.count("\n") == 1


def test_revoke_with_redis_down_says_what_happened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "v.db"
    verifier = Verifier.open(database, verifier_config())
    device = enroll(verifier)
    verifier.close()
    redis_port = free_port()

    status = cli_main([
        "verifier", "devices", "revoke", "--db", str(database),
        "--redis", f"redis://127.0.0.1:{redis_port}/0", "--", device.device_id,
    ])

    error = capsys.readouterr().err
    assert status == 1
    assert error.startswith(
        f"device-sdk: error: device {device.device_id} is revoked in {database}, but deleting "
        f"its pending challenges failed: Redis at 127.0.0.1:{redis_port}/0 failed: "
    )
    assert error.endswith(
        "Run the revoke again once that is fixed; until then its pending challenges are still "
        "refused, because the registry says revoked\n"
    )
