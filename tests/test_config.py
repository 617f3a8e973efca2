"""Tests for the device config file: validation, loading errors and atomic saving."""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_sdk import config as config_module
from device_sdk.config import DeviceConfig, load_config, save_config
from device_sdk.errors import ConfigError
from device_sdk.keys.base import compute_device_id

DEVICE_ID = compute_device_id(ec.generate_private_key(ec.SECP256R1()).public_key())
SECRET = "S3cr3tPin"


def full_config(**changes: Any) -> DeviceConfig:
    fields: dict[str, Any] = {
        "device_id": DEVICE_ID,
        "key_uri": "pkcs11:token=edge-01;object=device;type=private",
        "pin_source": "file:/etc/device-sdk/pin",
        "backend": "pkcs11",
        "hardware_backed": True,
        "algorithm": "ec-p256",
        "verifier_url": "https://verifier.example.com",
        "broker_url": "mqtts://broker.example.com:8883",
        "ca_bundle": Path("/etc/device-sdk/ca.pem"),
        "certificate_path": Path("/etc/device-sdk/device.pem"),
        "software_key_allowed": False,
    }
    fields.update(changes)
    return DeviceConfig(**fields)


def minimal_config(**changes: Any) -> DeviceConfig:
    fields: dict[str, Any] = {
        "device_id": DEVICE_ID,
        "key_uri": "tpm2:handle=0x81000010",
        "backend": "tpm2",
        "hardware_backed": True,
        "algorithm": "ec-p256",
        "verifier_url": "http://127.0.0.1:8080",
    }
    fields.update(changes)
    return DeviceConfig(**fields)


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return tmp_path / "device.toml"


# --- save and load --------------------------------------------------------------------------


def test_save_then_load_full_config(config_path: Path) -> None:
    config = full_config()
    save_config(config, config_path)
    assert load_config(config_path) == config


def test_save_then_load_minimal_config(config_path: Path) -> None:
    config = minimal_config()
    save_config(config, config_path)
    loaded = load_config(config_path)
    assert loaded == config
    assert loaded.pin_source is None
    assert loaded.broker_url is None
    assert loaded.ca_bundle is None
    assert loaded.software_key_allowed is False


def test_saved_text(config_path: Path) -> None:
    save_config(full_config(), config_path)
    assert config_path.read_text() == (
        f'device_id = "{DEVICE_ID}"\n'
        'key_uri = "pkcs11:token=edge-01;object=device;type=private"\n'
        'backend = "pkcs11"\n'
        "hardware_backed = true\n"
        'algorithm = "ec-p256"\n'
        'verifier_url = "https://verifier.example.com"\n'
        'pin_source = "file:/etc/device-sdk/pin"\n'
        'broker_url = "mqtts://broker.example.com:8883"\n'
        'ca_bundle = "/etc/device-sdk/ca.pem"\n'
        'certificate_path = "/etc/device-sdk/device.pem"\n'
        "software_key_allowed = false\n"
    )


def test_saved_file_has_mode_0600(config_path: Path) -> None:
    save_config(full_config(), config_path)
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600


def test_save_replaces_open_file_with_0600(config_path: Path) -> None:
    config_path.write_text("old")
    config_path.chmod(0o644)
    save_config(full_config(), config_path)
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    assert load_config(config_path) == full_config()


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_temp_file_is_0600_from_creation(
    config_path: Path, monkeypatch: pytest.MonkeyPatch, open_umask: None
) -> None:
    modes_at_creation: list[int] = []
    modes_at_replace: list[int] = []
    real_mkstemp = tempfile.mkstemp
    real_replace = os.replace

    def recording_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = real_mkstemp(*args, **kwargs)
        modes_at_creation.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return fd, name

    def recording_replace(source: str, target: Any) -> None:
        modes_at_replace.append(stat.S_IMODE(os.stat(source).st_mode))
        real_replace(source, target)

    monkeypatch.setattr(tempfile, "mkstemp", recording_mkstemp)
    monkeypatch.setattr(os, "replace", recording_replace)
    save_config(full_config(), config_path)
    assert modes_at_creation == [0o600]
    assert modes_at_replace == [0o600]
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600


def test_save_syncs_file_and_directory(config_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append(kind)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_config(full_config(), config_path)
    assert synced == ["file", "dir"]


def leftover_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_failed_replace_keeps_old_file(config_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = minimal_config()
    save_config(old, config_path)
    old_text = config_path.read_text()

    def failing_replace(source: str, target: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(ConfigError) as caught:
        save_config(full_config(), config_path)
    message = str(caught.value)
    assert f"cannot write config file {config_path}" in message
    assert "No space left on device" in message
    assert "previous file, if any, is unchanged" in message

    assert config_path.read_text() == old_text
    assert load_config(config_path) == old
    assert leftover_files(config_path.parent) == ["device.toml"]


def test_failed_fsync_keeps_old_file(config_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = minimal_config()
    save_config(old, config_path)

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(ConfigError, match="Input/output error"):
        save_config(full_config(), config_path)
    assert load_config(config_path) == old
    assert leftover_files(config_path.parent) == ["device.toml"]


def test_interrupt_during_replace_is_reraised(
    config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = minimal_config()
    save_config(old, config_path)

    def interrupted_replace(source: str, target: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        save_config(full_config(), config_path)
    assert load_config(config_path) == old
    assert leftover_files(config_path.parent) == ["device.toml"]


def test_save_into_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "device.toml"
    with pytest.raises(ConfigError) as caught:
        save_config(full_config(), path)
    assert f"directory {path.parent} does not exist" in str(caught.value)


# --- load errors ----------------------------------------------------------------------------


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def config_text(**fields: str | None) -> str:
    """Return the minimal config as TOML, each line replaced or (with None) removed."""
    lines = {
        "device_id": f'"{DEVICE_ID}"',
        "key_uri": '"tpm2:handle=0x81000010"',
        "backend": '"tpm2"',
        "hardware_backed": "true",
        "algorithm": '"ec-p256"',
        "verifier_url": '"https://verifier.example.com"',
    }
    lines.update(fields)
    return "".join(f"{name} = {value}\n" for name, value in lines.items() if value is not None)


def test_load_minimal_text(config_path: Path) -> None:
    write_config(config_path, config_text())
    assert load_config(config_path) == minimal_config(verifier_url="https://verifier.example.com")


def test_load_missing_file(config_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert f"config file {config_path} not found" in str(caught.value)


def test_load_invalid_toml(config_path: Path) -> None:
    write_config(config_path, config_text() + "broken = \n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    message = str(caught.value)
    assert f"config file {config_path} is not valid TOML" in message
    assert "line 7" in message


def test_load_invalid_utf8(config_path: Path) -> None:
    config_path.write_bytes(b'backend = "\xff"\n')
    with pytest.raises(ConfigError, match="is not valid UTF-8"):
        load_config(config_path)


LOAD_ERRORS = [
    # (changes to the minimal text, fragments of the message after the path)
    ({"device_id": None}, ["missing required field(s) device_id"]),
    (
        {"backend": None, "algorithm": None},
        ["missing required field(s) backend, algorithm"],
    ),
    ({"colour": '"blue"'}, ["unknown field(s) colour", "known fields: device_id, key_uri"]),
    ({"pin_value": '"1234"'}, ["unknown field(s) pin_value"]),
    ({"hardware_backed": '"yes"'}, ["field hardware_backed must be a boolean", "got str"]),
    ({"hardware_backed": "1"}, ["field hardware_backed must be a boolean", "got a number"]),
    ({"software_key_allowed": '"no"'}, ["field software_key_allowed must be a boolean"]),
    ({"backend": "1"}, ["field backend must be a string", "got a number"]),
    ({"pin_source": "1234"}, ["field pin_source must be a string", "got a number"]),
    ({"algorithm": "true"}, ["field algorithm must be a string", "a boolean"]),
    ({"verifier_url": "{ host = 'a' }"}, ["field verifier_url must be a string", "a table"]),
    ({"ca_bundle": '["a", "b"]'}, ["field ca_bundle must be a path string", "an array"]),
    ({"device_id": '"abc"'}, ["invalid device_id 'abc'", "43 characters"]),
    ({"algorithm": '"ec-p521"'}, ["invalid algorithm 'ec-p521'", "ec-p256"]),
    ({"backend": '""'}, ["backend is empty"]),
    ({"verifier_url": '"ftp://x"'}, ["invalid verifier_url 'ftp://x'", "http or https"]),
    ({"verifier_url": '"https://"'}, ["invalid verifier_url 'https://'"]),
    ({"verifier_url": '"https://[::1"'}, ["invalid verifier_url"]),
    ({"broker_url": '"http://broker"'}, ["invalid broker_url 'http://broker'", "mqtts"]),
    ({"key_uri": '"file:/etc/key.pem"'}, ["invalid key_uri", "unsupported key URI scheme"]),
    ({"key_uri": '"pkcs11:type=secret"'}, ["invalid key_uri", "'type'", "'secret'"]),
    ({"key_uri": '"tpm2:handle=0x1"'}, ["invalid key_uri", "invalid handle 0x1"]),
    ({"pin_source": '"file:relative"'}, ["invalid pin_source", "absolute path"]),
]


@pytest.mark.parametrize(("changes", "fragments"), LOAD_ERRORS)
def test_load_errors(config_path: Path, changes: dict[str, str | None], fragments: list[str]):
    write_config(config_path, config_text(**changes))
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    message = str(caught.value)
    assert message.startswith(f"config file {config_path}")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    "key_uri",
    [
        f"pkcs11:token=t;object=o?pin-value={SECRET}",
        f"PKCS11:token=t?pin-value={SECRET}",
        f"pkcs11:token=t;pin-value={SECRET}",
        f"pkcs11:token=t?pin-value={SECRET}%zz",
    ],
)
def test_load_rejects_key_uri_pin_value(config_path: Path, key_uri: str) -> None:
    write_config(config_path, config_text(key_uri=f'"{key_uri}"', backend='"pkcs11"'))
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    message = str(caught.value)
    assert "pin-value" in message
    assert SECRET not in message


def test_pin_value_error_says_how_to_fix() -> None:
    with pytest.raises(ConfigError) as caught:
        full_config(key_uri="pkcs11:token=t?pin-value=1234", pin_source=None)
    message = str(caught.value)
    assert "config file must hold no PIN" in message
    assert 'pin_source = "file:/path/to/pin"' in message
    assert "1234" not in message


@pytest.mark.parametrize("pin_source", ["1234", 1234, b"1234"])
def test_pin_source_value_not_shown(pin_source: object) -> None:
    with pytest.raises(ConfigError) as caught:
        full_config(pin_source=pin_source)
    assert "pin_source" in str(caught.value)
    assert "1234" not in str(caught.value)


def test_load_pin_number_not_shown(config_path: Path) -> None:
    write_config(config_path, config_text(pin_source="987654"))
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert "987654" not in str(caught.value)


def test_key_uri_pin_source_must_be_readable() -> None:
    with pytest.raises(ConfigError) as caught:
        full_config(key_uri="pkcs11:token=t?pin-source=1234", pin_source=None)
    message = str(caught.value)
    assert "invalid pin-source in key_uri" in message
    assert "1234" not in message


def test_conflicting_pin_sources() -> None:
    with pytest.raises(ConfigError, match="key_uri has pin-source 'env:A' but pin_source is"):
        full_config(key_uri="pkcs11:token=t?pin-source=env:A", pin_source="env:B")


def test_matching_pin_sources_are_accepted() -> None:
    config = full_config(key_uri="pkcs11:token=t?pin-source=env:A", pin_source="env:A")
    assert config.pin_source == "env:A"


def test_serial_key_uri_is_accepted() -> None:
    config = minimal_config(key_uri="serial:/dev/ttyACM0?baud=115200&slot=0", backend="serial")
    assert config.key_uri == "serial:/dev/ttyACM0?baud=115200&slot=0"


def test_path_fields_accept_strings() -> None:
    config = full_config(ca_bundle="/etc/ca.pem", certificate_path="/etc/device.pem")
    assert config.ca_bundle == Path("/etc/ca.pem")
    assert config.certificate_path == Path("/etc/device.pem")


def test_constructor_rejects_wrong_types() -> None:
    with pytest.raises(
        ConfigError, match="hardware_backed must be a boolean .true or false., got int"
    ):
        full_config(hardware_backed=1)
    with pytest.raises(ConfigError, match="device_id must be a string, got NoneType"):
        full_config(device_id=None)


def test_config_is_frozen() -> None:
    config = full_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.backend = "tpm2"  # type: ignore[misc]


def test_load_warns_when_others_can_write(
    config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_config(config_path, config_text())
    config_path.chmod(0o666)
    with caplog.at_level(logging.WARNING, logger="device_sdk.config"):
        load_config(config_path)
    assert f"config file {config_path} has mode 0666" in caplog.text
    assert f"chmod 600 {config_path}" in caplog.text


def test_load_private_file_logs_no_warning(
    config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_config(config_path, config_text())
    with caplog.at_level(logging.WARNING, logger="device_sdk.config"):
        load_config(config_path)
    assert caplog.records == []


def test_public_names() -> None:
    assert sorted(config_module.__all__) == [
        "ALGORITHMS",
        "DeviceConfig",
        "export_softhsm2_conf",
        "load_config",
        "save_config",
    ]
