"""The softhsm2_conf config field: written for SoftHSM keys, used when SOFTHSM2_CONF is unset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_provision import ProvisionLab

from device_sdk.config import DeviceConfig, export_softhsm2_conf, load_config
from device_sdk.errors import ConfigError

DEVICE_ID = "q0S3" + "A" * 39


def without_softhsm2_conf(lab: ProvisionLab) -> dict[str, str]:
    return {key: value for key, value in lab.env.items() if key != "SOFTHSM2_CONF"}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_sdk", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def test_auto_softhsm_config_works_without_variable(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    config_path = lab.directory / "auto" / "device.toml"
    env = without_softhsm2_conf(lab)
    provision_args = [
        "provision", "--auto", "--allow-software-key",
        "--verifier", lab.verifier_url,
        "--enrollment-token-file", str(lab.enrollment_token_file()),
        "--config", str(config_path), "--json",
    ]

    provisioned = run(provision_args, env)

    assert provisioned.returncode == 0, provisioned.stderr
    store_conf = config_path.parent / "softhsm" / "softhsm2.conf"
    config = load_config(config_path)
    assert config.softhsm2_conf == store_conf
    assert f'softhsm2_conf = "{store_conf}"' in config_path.read_text()

    login = run(["login", "--config", str(config_path), "--http", "--json"], env)
    assert login.returncode == 0, login.stderr
    assert json.loads(login.stdout)["http"]["ok"] is True

    info = run(["info", "--config", str(config_path), "--json"], env)
    assert info.returncode == 0, info.stderr

    # A re-run without the variable finds the same key through the config.
    again = run(provision_args, env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["device_id"] == config.device_id
    assert [d["device_id"] for d in lab.devices()] == [config.device_id]


def test_explicit_softhsm_key_records_store(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    config_path = lab.directory / "device.toml"

    completed = lab.run(
        *lab.provision_args(lab.key_uri(token), config_path, lab.enrollment_token_file())
    )

    assert completed.returncode == 0, completed.stderr
    assert load_config(config_path).softhsm2_conf == lab.store.conf_path
    login = run(["login", "--config", str(config_path), "--http"], without_softhsm2_conf(lab))
    assert login.returncode == 0, login.stderr


def sample_config(**changes: object) -> DeviceConfig:
    fields = {
        "device_id": DEVICE_ID,
        "key_uri": "pkcs11:token=edge-01;object=device",
        "backend": "softhsm",
        "hardware_backed": False,
        "algorithm": "ec-p256",
        "verifier_url": "https://verifier.example.com",
    }
    fields.update(changes)
    return DeviceConfig(**fields)  # type: ignore[arg-type]


def test_relative_softhsm2_conf_rejected() -> None:
    with pytest.raises(ConfigError) as caught:
        sample_config(softhsm2_conf="store/softhsm2.conf")

    assert str(caught.value).startswith(
        "softhsm2_conf 'store/softhsm2.conf' is a relative path; give the absolute path"
    )


def test_export_keeps_variable_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFTHSM2_CONF", "/from/environment.conf")
    config = sample_config(softhsm2_conf="/from/config.conf")

    assert export_softhsm2_conf(config) is False
    assert config.softhsm2_conf == Path("/from/config.conf")
    assert os.environ["SOFTHSM2_CONF"] == "/from/environment.conf"


def test_export_sets_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOFTHSM2_CONF", raising=False)
    config = sample_config(softhsm2_conf="/from/config.conf")

    assert export_softhsm2_conf(config) is True
    assert os.environ["SOFTHSM2_CONF"] == "/from/config.conf"


def test_config_without_field_exports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOFTHSM2_CONF", raising=False)

    assert export_softhsm2_conf(sample_config()) is False
    assert "SOFTHSM2_CONF" not in os.environ
