"""``device-sdk login``: one HTTP and one MQTT login from a device config file, over TLS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fixtures_login import AmqttStack

from device_sdk.config import DeviceConfig, save_config

pytestmark = pytest.mark.slow


def write_config(path: Path, key_uri: str, device_id: str, stack: AmqttStack) -> Path:
    config = DeviceConfig(
        device_id=device_id,
        key_uri=key_uri,
        backend="pkcs11",
        hardware_backed=False,
        algorithm="ec-p256",
        verifier_url=stack.verifier.url,
        broker_url=stack.broker_url,
        ca_bundle=stack.pki.ca.cert_path,
        software_key_allowed=True,
    )
    save_config(config, path)
    return path


def run_login(config: Path, env: dict[str, str], *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_sdk", "login", "--config", str(config), *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_login_json_reports_both_ways(
    amqtt_stack: AmqttStack,
    softhsm_key_uri: str,
    device_key: Any,
    softhsm_env: dict[str, str],
    tmp_path: Path,
) -> None:
    device_id = amqtt_stack.verifier.enroll(device_key)
    config = write_config(tmp_path / "device.toml", softhsm_key_uri, device_id, amqtt_stack)

    result = run_login(config, softhsm_env, "--http", "--mqtt", "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["device_id"] == device_id
    assert report["http"]["ok"] is True
    assert report["http"]["expires_in"] == 300
    assert report["mqtt"]["ok"] is True
    assert report["mqtt"]["channel_bound"] is True
    assert report["http"]["ms"] > 0
    assert report["mqtt"]["ms"] > 0
    assert "eyJ" not in result.stdout + result.stderr


def test_login_unknown_device_fails_with_reason(
    amqtt_stack: AmqttStack,
    softhsm_key_uri: str,
    device_key: Any,
    softhsm_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # The key is not enrolled, so the verifier gives it no challenge.
    config = write_config(
        tmp_path / "device.toml", softhsm_key_uri, device_key.device_id, amqtt_stack
    )

    result = run_login(config, softhsm_env, "--http", "--json")

    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["http"]["ok"] is False
    assert report["http"]["error"].startswith(
        "challenge request: the verifier rejected the device (HTTP 401)"
    )
    assert "mqtt" not in report


def test_login_text_output(
    amqtt_stack: AmqttStack,
    softhsm_key_uri: str,
    device_key: Any,
    softhsm_env: dict[str, str],
    tmp_path: Path,
) -> None:
    device_id = amqtt_stack.verifier.enroll(device_key)
    config = write_config(tmp_path / "device.toml", softhsm_key_uri, device_id, amqtt_stack)

    result = run_login(config, softhsm_env)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"device {device_id} (key opened in ")
    assert lines[1].startswith("http: logged in in ")
    assert lines[2].startswith("mqtt: logged in in ")
