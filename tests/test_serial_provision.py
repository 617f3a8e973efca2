"""`device-sdk provision` and `device-sdk login` with a key in the simulated serial secure element.

The verifier runs over HTTPS and the amqtt broker over TLS (``amqtt_stack``). The device
commands run in subprocesses, as on a device, and open the simulator's ``--link`` path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from fixtures_login import MANAGEMENT_ISSUER, AmqttStack
from fixtures_serial import Simulator

from device_sdk.config import load_config
from device_sdk.keys import compute_device_id
from device_sdk.verifier import Verifier, VerifierConfig

pytestmark = pytest.mark.slow


def enrollment_token_file(stack: AmqttStack, path: Path) -> Path:
    verifier = Verifier.open(stack.verifier.db_path, VerifierConfig(issuer=MANAGEMENT_ISSUER))
    try:
        (token,) = verifier.create_enrollment_tokens(1)
    finally:
        verifier.close()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    return path


def device_sdk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_sdk", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def provision(
    stack: AmqttStack, key_uri: str, config: Path, token_file: Path
) -> subprocess.CompletedProcess[str]:
    return device_sdk(
        "provision",
        "--key", key_uri,
        "--allow-software-key",
        "--verifier", stack.verifier.url,
        "--enrollment-token-file", str(token_file),
        "--config", str(config),
        "--ca-bundle", str(stack.pki.ca.cert_path),
        "--broker", stack.broker_url,
        "--json",
    )  # fmt: skip


def login(config: Path) -> dict[str, object]:
    completed = device_sdk("login", "--config", str(config), "--http", "--mqtt", "--json")
    assert completed.returncode == 0, completed.stderr
    report: dict[str, object] = json.loads(completed.stdout)
    return report


def slot_device_id(simulator: Simulator, slot: int) -> str:
    pem = (simulator.state_dir / f"slot-{slot}.pem").read_bytes()
    private = serialization.load_pem_private_key(pem, password=None)
    return compute_device_id(private.public_key())  # type: ignore[arg-type]


def test_provision_and_login_with_serial_key(
    amqtt_stack: AmqttStack, serial_simulator: Simulator, tmp_path: Path
) -> None:
    config_path = tmp_path / "device.toml"

    completed = provision(
        amqtt_stack,
        serial_simulator.uri,
        config_path,
        enrollment_token_file(amqtt_stack, tmp_path / "t1"),
    )

    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["backend"] == "serial"
    assert result["hardware_backed"] is False
    assert result["key_generated"] is True
    assert result["device_id"] == slot_device_id(serial_simulator, 0)
    config = load_config(config_path)
    assert config.key_uri == f"serial:{serial_simulator.link}?baud=115200&slot=0"
    assert config.backend == "serial"
    assert config.hardware_backed is False
    assert config.device_id == result["device_id"]

    report = login(config_path)

    assert report["device_id"] == config.device_id
    assert report["http"]["ok"] is True  # type: ignore[index]
    assert report["mqtt"]["ok"] is True  # type: ignore[index]


def test_login_after_power_cycle(
    amqtt_stack: AmqttStack, serial_simulator: Simulator, tmp_path: Path
) -> None:
    config_path = tmp_path / "device.toml"
    token_file = enrollment_token_file(amqtt_stack, tmp_path / "t1")
    first = provision(amqtt_stack, serial_simulator.uri, config_path, token_file)
    assert first.returncode == 0, first.stderr

    serial_simulator.stop()
    serial_simulator.start()
    second = provision(amqtt_stack, serial_simulator.uri, config_path, token_file)
    report = login(config_path)

    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    statuses = {step["step"]: step["status"] for step in result["steps"]}
    assert statuses["enroll"] == "recorded"
    assert sorted(path.name for path in serial_simulator.state_dir.glob("slot-*.pem")) == [
        "slot-0.pem"
    ]
    assert result["device_id"] == json.loads(first.stdout)["device_id"]
    assert report["device_id"] == result["device_id"]
    assert report["http"]["ok"] is True  # type: ignore[index]
    assert report["mqtt"]["ok"] is True  # type: ignore[index]
