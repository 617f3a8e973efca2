"""`device-sdk provision` and `device-sdk login` with a TPM key on swtpm, end to end.

The verifier runs over HTTPS and the amqtt broker over TLS (``amqtt_stack``); the device
commands run in subprocesses, as on a device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_login import MANAGEMENT_ISSUER, AmqttStack
from fixtures_tpm import Swtpm, require_tpm_stack

from device_sdk.config import load_config
from device_sdk.verifier import Verifier, VerifierConfig

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _tpm_stack() -> None:
    require_tpm_stack()


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


def device_sdk(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_sdk", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def provision(
    stack: AmqttStack, key_uri: str, config: Path, token_file: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return device_sdk(
        "provision",
        "--key", key_uri,
        "--verifier", stack.verifier.url,
        "--enrollment-token-file", str(token_file),
        "--config", str(config),
        "--ca-bundle", str(stack.pki.ca.cert_path),
        "--broker", stack.broker_url,
        "--json",
        env=env,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["path", "handle"])
def test_provision_and_login_with_tpm_key(
    kind: str, amqtt_stack: AmqttStack, swtpm: Swtpm, tmp_path: Path
) -> None:
    key_uri = swtpm.path_uri(tmp_path / "device.tss2.pem") if kind == "path" else swtpm.handle_uri()
    config_path = tmp_path / "device.toml"
    env = swtpm.environment()

    completed = provision(
        amqtt_stack, key_uri, config_path, enrollment_token_file(amqtt_stack, tmp_path / "t1"), env
    )

    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["backend"] == "tpm"
    assert result["hardware_backed"] is True
    assert result["key_generated"] is True
    config = load_config(config_path)
    assert config.key_uri == key_uri
    assert config.backend == "tpm"
    assert config.hardware_backed is True
    assert config.device_id == result["device_id"]

    login = device_sdk("login", "--config", str(config_path), "--http", "--mqtt", "--json", env=env)

    assert login.returncode == 0, login.stderr
    report = json.loads(login.stdout)
    assert report["device_id"] == config.device_id
    assert report["http"]["ok"] is True
    assert report["mqtt"]["ok"] is True
    assert report["mqtt"]["channel_bound"] is True


def test_provision_rerun_keeps_tpm_key(
    amqtt_stack: AmqttStack, swtpm: Swtpm, tmp_path: Path
) -> None:
    blob = tmp_path / "device.tss2.pem"
    config_path = tmp_path / "device.toml"
    env = swtpm.environment()
    token_file = enrollment_token_file(amqtt_stack, tmp_path / "t1")
    first = provision(amqtt_stack, swtpm.path_uri(blob), config_path, token_file, env)
    assert first.returncode == 0, first.stderr
    blob_before = blob.read_bytes()

    second = provision(amqtt_stack, swtpm.path_uri(blob), config_path, token_file, env)

    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    statuses = {step["step"]: step["status"] for step in result["steps"]}
    assert result["device_id"] == json.loads(first.stdout)["device_id"]
    assert statuses["enroll"] == "recorded"
    assert statuses["login"] == "done"
    assert blob.read_bytes() == blob_before
    assert sorted(path.name for path in tmp_path.glob("*.tss2.pem")) == ["device.tss2.pem"]
    devices = Verifier.open(amqtt_stack.verifier.db_path, VerifierConfig(issuer=MANAGEMENT_ISSUER))
    try:
        assert [record.device_id for record in devices.list_devices()] == [result["device_id"]]
    finally:
        devices.close()


def test_provision_auto_prefers_tpm(amqtt_stack: AmqttStack, swtpm: Swtpm, tmp_path: Path) -> None:
    blob = tmp_path / "keys" / "auto.tss2.pem"
    config_path = tmp_path / "device.toml"
    env = swtpm.environment()
    env["DEVICE_SDK_TPM_KEY_PATH"] = str(blob)
    env.pop("DEVICE_SDK_KEY_URI", None)

    completed = device_sdk(
        "provision", "--auto", "--allow-software-key",
        "--verifier", amqtt_stack.verifier.url,
        "--enrollment-token-file", str(enrollment_token_file(amqtt_stack, tmp_path / "t1")),
        "--config", str(config_path),
        "--ca-bundle", str(amqtt_stack.pki.ca.cert_path),
        "--json",
        env=env,
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["backend"] == "tpm"
    assert result["hardware_backed"] is True
    assert load_config(config_path).key_uri == f"tpm2:path={blob}?tcti={swtpm.tcti}"
    assert blob.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----\n")
