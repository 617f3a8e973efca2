"""Provisioning and login input errors: one error line, named path or URL, nothing created."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_provision import ProvisionLab
from fixtures_services import free_port

from device_sdk.config import load_config, save_config
from device_sdk.errors import ConfigError, ProvisioningError
from device_sdk.keys.uri import read_secret_file
from device_sdk.provisioning import ProvisioningRequest, provision
from device_sdk.provisioning.state import (
    ProvisioningState,
    load_state,
    save_state,
    state_path_for,
)

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


@contextlib.contextmanager
def read_only_directory(directory: Path) -> Iterator[None]:
    """Make ``directory`` unwritable for this process: mode 0500, or the immutable flag for root.

    Root ignores file modes, so as root the directory gets ``chattr +i`` (ext4 and most
    local file systems support it) and loses it again afterwards.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield
        finally:
            directory.chmod(0o700)
        return

    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("chattr not found; install it with: sudo apt-get install -y e2fsprogs")
    chattr_run = subprocess.run([chattr, "+i", str(directory)], capture_output=True, text=True)
    if chattr_run.returncode != 0:
        pytest.skip(f"cannot make {directory} immutable as root: {chattr_run.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(directory)], check=True)


def test_provision_config_parent_is_file(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    blocker = lab.directory / "file"
    blocker.write_text("not a directory\n")
    config_path = blocker / "device.toml"

    line = one_error_line(
        lab.run(*lab.provision_args(lab.key_uri(token), config_path, lab.enrollment_token_file()))
    )

    assert line == (
        f"device-sdk: error: cannot create config directory {blocker}: {blocker} is a file, "
        "not a directory; pass --config with a path whose parent is a directory"
    )
    assert lab.count_objects(token)["private_keys"] == 0


def test_provision_config_under_file_path(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    blocker = lab.directory / "file"
    blocker.write_text("not a directory\n")
    config_path = blocker / "sub" / "device.toml"

    line = one_error_line(
        lab.run(*lab.provision_args(lab.key_uri(token), config_path, lab.enrollment_token_file()))
    )

    assert f"cannot create config directory {blocker / 'sub'}: {blocker} is a file" in line
    assert lab.count_objects(token)["private_keys"] == 0


def test_provision_read_only_config_directory(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    directory = lab.directory / "etc"
    token_file = lab.enrollment_token_file()

    with read_only_directory(directory):
        line = one_error_line(
            lab.run(*lab.provision_args(lab.key_uri(token), directory / "device.toml", token_file))
        )
        assert list(directory.iterdir()) == []

    assert line == (
        f"device-sdk: error: config directory {directory} is not writable by this user; make "
        "it writable, or pass --config with a path in a directory this user can write"
    )
    assert lab.count_objects(token)["private_keys"] == 0


def test_provision_lock_directory_under_file(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    blocker = lab.directory / "file"
    blocker.write_text("not a directory\n")
    args = lab.provision_args(
        lab.key_uri(token), lab.directory / "device.toml", lab.enrollment_token_file()
    )

    line = one_error_line(lab.run(*args, env={"DEVICE_SDK_LOCK_DIR": str(blocker / "locks")}))

    assert line.startswith(f"device-sdk: error: lock: cannot open lock file {blocker}/locks/")
    assert line.endswith(
        ": Not a directory; set DEVICE_SDK_LOCK_DIR to a directory this user can write"
    )
    assert lab.count_objects(token)["private_keys"] == 0


def test_save_state_read_only_directory(tmp_path: Path) -> None:
    directory = tmp_path / "etc"
    path = directory / "device.toml.state"

    with read_only_directory(directory), pytest.raises(ProvisioningError) as caught:
        save_state(path, ProvisioningState(key_uri="pkcs11:token=edge-01;object=device"))

    message = str(caught.value)
    assert message.startswith(f"state: cannot write state file {path}: ")
    assert message.endswith(
        f"; make {directory} writable by this user, or pass --config with a path in a "
        "writable directory"
    )


def test_load_state_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "device.toml.state"
    path.mkdir()

    with pytest.raises(ProvisioningError) as caught:
        load_state(path)

    assert str(caught.value) == (
        f"state: cannot read state file {path}: Is a directory; make it readable by this "
        "user, or delete it to start provisioning over"
    )


def bad_token_file(directory: Path, content: str, mode: int) -> Path:
    path = directory / "enroll.token"
    path.write_text(content)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    ("content", "mode", "expected"),
    [
        (
            "token\n",
            0o644,
            "enrollment token file {path} has mode 0644, which gives group or others access; "
            "run: chmod 600 {path}",
        ),
        ("", 0o600, "enrollment token file {path} is empty; write the enrollment token to it"),
        (
            " \n\n",
            0o600,
            "enrollment token file {path} contains only white space; write the enrollment "
            "token to it",
        ),
    ],
)
def test_bad_token_file_creates_nothing(
    provision_lab: ProvisionLab, content: str, mode: int, expected: str
) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    path = bad_token_file(lab.directory, content, mode)
    config_path = lab.directory / "etc" / "device.toml"

    line = one_error_line(lab.run(*lab.provision_args(lab.key_uri(token), config_path, path)))

    assert line == "device-sdk: error: " + expected.format(path=path)
    assert "PIN" not in line
    assert lab.count_objects(token)["private_keys"] == 0
    assert not config_path.parent.exists()
    assert lab.devices() == []


def test_missing_token_file_creates_nothing(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    path = lab.directory / "absent.token"
    config_path = lab.directory / "etc" / "device.toml"

    line = one_error_line(lab.run(*lab.provision_args(lab.key_uri(token), config_path, path)))

    assert line == (
        f"device-sdk: error: enrollment token file {path} not found; write the enrollment "
        f"token to it and run: chmod 600 {path}"
    )
    assert lab.count_objects(token)["private_keys"] == 0
    assert not config_path.parent.exists()


def test_no_token_file_fails_before_new_key(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    config_path = lab.directory / "device.toml"
    args = lab.provision_args(lab.key_uri(token), config_path, lab.directory / "unused")
    at = args.index("--enrollment-token-file")
    del args[at : at + 2]

    line = one_error_line(lab.run(*args))

    assert line.startswith(
        "device-sdk: error: key: missing enrollment token file: pass --enrollment-token-file"
    )
    assert lab.count_objects(token)["private_keys"] == 0
    assert not state_path_for(config_path).exists()


def test_token_file_debug_log_names_token(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    token_file = lab.enrollment_token_file()
    config_path = lab.directory / "device.toml"

    completed = lab.run(
        "--debug", *lab.provision_args(lab.key_uri(token), config_path, token_file)
    )

    assert completed.returncode == 0, completed.stderr
    assert f"read the enrollment token from file {token_file}" in completed.stderr
    assert f"read the PIN from file {token_file}" not in completed.stderr
    assert token_file.read_text().strip() not in completed.stderr


def test_read_secret_file_names_secret(tmp_path: Path) -> None:
    path = bad_token_file(tmp_path, "secret-value\n", 0o640)

    with pytest.raises(ConfigError) as caught:
        read_secret_file(str(path), "enrollment token")

    assert str(caught.value) == (
        f"enrollment token file {path} has mode 0640, which gives group or others access; "
        f"run: chmod 600 {path}"
    )
    path.chmod(0o600)
    assert read_secret_file(str(path), "enrollment token") == "secret-value"
