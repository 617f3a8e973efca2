"""Provisioning and login input errors: one error line, named path or URL, nothing created."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
from fixtures_provision import ProvisionLab
from fixtures_services import free_port

from device_sdk.config import load_config, save_config
from device_sdk.errors import ConfigError
from device_sdk.provisioning import ProvisioningRequest, provision

REMOTE_HTTP_URL = "http://verifier.example.com"


def no_remote_traffic() -> dict[str, str]:
    """Route any HTTP request to a closed loopback port, so a test never reaches another host.

    httpx and requests read these variables; with a proxy set they resolve no host names either.
    """
    proxy = f"http://127.0.0.1:{free_port()}"
    return {"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "ALL_PROXY": proxy, "NO_PROXY": ""}


def one_error_line(completed: subprocess.CompletedProcess[str]) -> str:
    assert completed.returncode == 1, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("device-sdk: error: ")
    return lines[0]


def test_provision_rejects_remote_http_verifier(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    config_path = lab.directory / "device.toml"
    args = lab.provision_args(lab.key_uri(token), config_path, lab.enrollment_token_file())
    args[args.index("--verifier") + 1] = REMOTE_HTTP_URL

    line = one_error_line(lab.run(*args, env=no_remote_traffic()))

    assert f"verifier URL '{REMOTE_HTTP_URL}' uses plain http" in line
    assert "the enrollment token would travel unencrypted" in line
    assert "use https://verifier.example.com" in line
    assert lab.count_objects(token)["private_keys"] == 0
    assert not config_path.exists()


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.5:8000", "http://localhost.example.com", "http://[fe80::1]:80"],
)
def test_provision_library_rejects_remote_http(tmp_path: Path, url: str) -> None:
    request = ProvisioningRequest(
        key_uri="pkcs11:token=edge-01;object=device",
        config_path=tmp_path / "device.toml",
        verifier_url=url,
    )

    with pytest.raises(ConfigError) as caught:
        provision(request)

    assert f"verifier URL '{url}' uses plain http" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_login_rejects_remote_http_verifier(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    config_path = lab.directory / "device.toml"
    completed = lab.run(
        *lab.provision_args(lab.key_uri(token), config_path, lab.enrollment_token_file())
    )
    assert completed.returncode == 0, completed.stderr
    config = load_config(config_path)
    save_config(dataclasses.replace(config, verifier_url=REMOTE_HTTP_URL), config_path)

    line = one_error_line(lab.run("login", "--config", str(config_path), env=no_remote_traffic()))

    assert f"verifier_url in {config_path} '{REMOTE_HTTP_URL}' uses plain http" in line
    assert "use https://verifier.example.com" in line


def test_login_accepts_loopback_http(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    config_path = lab.directory / "device.toml"
    completed = lab.run(
        *lab.provision_args(lab.key_uri(token), config_path, lab.enrollment_token_file())
    )
    assert completed.returncode == 0, completed.stderr
    assert lab.verifier_url.startswith("http://127.0.0.1:")

    login = lab.login(config_path)

    assert login.returncode == 0, login.stderr
