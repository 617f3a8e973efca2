"""The last resort in ``device-sdk``: an OSError that escapes a command becomes one error line."""

from __future__ import annotations

import argparse
import errno

import pytest

from device_sdk.cli import login, main


def raise_permission_error(args: argparse.Namespace) -> int:
    raise PermissionError(errno.EACCES, "Permission denied", "/etc/device-sdk/device.toml")


def raise_rename_error(args: argparse.Namespace) -> int:
    raise OSError(errno.EXDEV, "Invalid cross-device link", "/tmp/a", None, "/mnt/b")


@pytest.fixture
def failing_login(monkeypatch: pytest.MonkeyPatch) -> None:
    # register() binds the module's run() when main() builds the parser.
    monkeypatch.setattr(login, "run", raise_permission_error)


def test_os_error_is_one_line(
    failing_login: None, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main.main(["login", "--config", "device.toml"])

    assert status == 1
    assert capsys.readouterr().err == (
        "device-sdk: error: login: Permission denied: /etc/device-sdk/device.toml\n"
    )


def test_os_error_traceback_with_debug(
    failing_login: None, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main.main(["--debug", "login", "--config", "device.toml"])

    err = capsys.readouterr().err
    assert status == 1
    assert "Traceback (most recent call last)" in err
    assert err.endswith(
        "device-sdk: error: login: Permission denied: /etc/device-sdk/device.toml\n"
    )


def test_os_error_names_both_paths(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(login, "run", raise_rename_error)

    status = main.main(["login", "--config", "device.toml"])

    assert status == 1
    assert capsys.readouterr().err == (
        "device-sdk: error: login: Invalid cross-device link: /tmp/a -> /mnt/b\n"
    )


def test_command_name_includes_subcommand() -> None:
    args = argparse.Namespace(command="softhsm", softhsm_command="init")

    assert main.command_name(args) == "softhsm init"
