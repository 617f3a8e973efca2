"""The rig's inventory checks, its SSH command transport, power frames and capability skips."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hil.inventory import InventoryError, load_inventory, parse_inventory
from hil.power import relay_frame, uhubctl_argv
from hil.report import latency_summary
from hil.transport import LocalTransport, SSHTransport, transport_for

REPO_ROOT = Path(__file__).resolve().parent.parent
SIM_RIG = REPO_ROOT / "hil" / "sim-rig.toml"

GOOD_DEVICE = """
[[device]]
name = "pi-01"
key = "tpm2:handle=0x81000010?tcti=device:/dev/tpmrm0"
access = { kind = "ssh", host = "pi-01.invalid", user = "pi" }
power = { kind = "usb-relay", port = "/dev/ttyUSB3", channel = 2 }
capabilities = { algorithms = ["ec-p256"], power = true, unplug = false }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rig.toml"
    path.write_text(textwrap.dedent(text))
    return path


def error_for(tmp_path: Path, text: str) -> str:
    with pytest.raises(InventoryError) as caught:
        load_inventory(write(tmp_path, text))
    return str(caught.value)


# --- inventory --------------------------------------------------------------------------------


def test_sim_rig_inventory_loads() -> None:
    inventory = load_inventory(SIM_RIG)

    names = [device.name for device in inventory.devices]
    assert "softhsm" in names
    for device in inventory.devices:
        assert device.access.kind == "local"
        assert device.sim is not None
        assert device.disposable is True


def test_good_ssh_device_fields(tmp_path: Path) -> None:
    inventory = load_inventory(write(tmp_path, GOOD_DEVICE))

    device = inventory.device("pi-01")
    assert device.access.host == "pi-01.invalid"
    assert device.access.user == "pi"
    assert device.access.port == 22
    assert device.power.kind == "usb-relay"
    assert device.power.port == "/dev/ttyUSB3"
    assert device.power.channel == 2
    assert device.capabilities.power is True
    assert device.capabilities.unplug is False
    assert device.disposable is False
    assert inventory.sign_count == 200
    assert inventory.services.advertise == "127.0.0.1"


def test_typo_in_device_field(tmp_path: Path) -> None:
    message = error_for(tmp_path, GOOD_DEVICE.replace("capabilities =", "capabilites ="))

    assert message == (
        "device 'pi-01': unknown field 'capabilites'; did you mean 'capabilities'?"
    )


def test_typo_in_capability(tmp_path: Path) -> None:
    message = error_for(tmp_path, GOOD_DEVICE.replace("unplug = false", "unplugg = false"))

    assert message == (
        "device 'pi-01': capabilities: unknown field 'unplugg'; did you mean 'unplug'?"
    )


def test_missing_key_field(tmp_path: Path) -> None:
    text = GOOD_DEVICE.replace('key = "tpm2:handle=0x81000010?tcti=device:/dev/tpmrm0"\n', "")

    assert error_for(tmp_path, text) == "device 'pi-01': missing field 'key'"


def test_missing_name_uses_position(tmp_path: Path) -> None:
    text = GOOD_DEVICE.replace('name = "pi-01"\n', "")

    assert error_for(tmp_path, text) == "device #1: missing field 'name'"


def test_relay_without_port(tmp_path: Path) -> None:
    text = GOOD_DEVICE.replace('port = "/dev/ttyUSB3", ', "")

    assert error_for(tmp_path, text) == "device 'pi-01': power (usb-relay): missing field 'port'"


def test_uhubctl_without_port(tmp_path: Path) -> None:
    text = GOOD_DEVICE.replace(
        'power = { kind = "usb-relay", port = "/dev/ttyUSB3", channel = 2 }',
        'power = { kind = "uhubctl", location = "1-1.2" }',
    )

    assert error_for(tmp_path, text) == "device 'pi-01': power (uhubctl): missing field 'port'"


def test_unknown_power_kind(tmp_path: Path) -> None:
    text = GOOD_DEVICE.replace('kind = "usb-relay"', 'kind = "relay"')

    assert error_for(tmp_path, text) == (
        "device 'pi-01': power: invalid kind 'relay': use one of none, command, usb-relay, "
        "uhubctl, sim"
    )


def test_command_power_needs_off(tmp_path: Path) -> None:
    text = GOOD_DEVICE.replace(
        'power = { kind = "usb-relay", port = "/dev/ttyUSB3", channel = 2 }',
        'power = { kind = "command", on = "plug pi-01 on" }',
    )

    assert error_for(tmp_path, text) == "device 'pi-01': power (command): missing field 'off'"


def test_relay_channel_must_be_integer(tmp_path: Path) -> None:
    text = GOOD_DEVICE.replace("channel = 2", 'channel = "2"')

    assert error_for(tmp_path, text) == (
        "device 'pi-01': power (usb-relay): field 'channel' must be an integer, got a string"
    )


def test_power_capability_without_power(tmp_path: Path) -> None:
    text = GOOD_DEVICE.replace(
        'power = { kind = "usb-relay", port = "/dev/ttyUSB3", channel = 2 }\n', ""
    )

    assert error_for(tmp_path, text) == (
        "device 'pi-01': capabilities.power is true, but the device has no power control; add "
        "a 'power' table or set the capability to false"
    )


def test_ssh_access_without_user(tmp_path: Path) -> None:
    text = GOOD_DEVICE.replace(', user = "pi"', "")

    assert error_for(tmp_path, text) == "device 'pi-01': access: missing field 'user'"


def test_access_missing(tmp_path: Path) -> None:
    access = 'access = { kind = "ssh", host = "pi-01.invalid", user = "pi" }\n'
    text = GOOD_DEVICE.replace(access, "")

    assert error_for(tmp_path, text) == (
        "device 'pi-01': missing field 'access' (\"local\" or an ssh table)"
    )


def test_unknown_algorithm(tmp_path: Path) -> None:
    text = GOOD_DEVICE.replace('algorithms = ["ec-p256"]', 'algorithms = ["p256"]')

    assert error_for(tmp_path, text) == (
        "device 'pi-01': capabilities: invalid algorithm 'p256' in 'algorithms': use ec-p256, "
        "ec-p384, ed25519, rsa-pss-2048, rsa-pss-3072"
    )


def test_pin_value_in_key_uri(tmp_path: Path) -> None:
    text = GOOD_DEVICE.replace(
        'key = "tpm2:handle=0x81000010?tcti=device:/dev/tpmrm0"',
        'key = "pkcs11:token=t;object=k?pin-value=1234"',
    )

    message = error_for(tmp_path, text)

    assert message.startswith("device 'pi-01': the key URI contains a pin-value")
    assert "1234" not in message


def test_duplicate_device_name(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_DEVICE + GOOD_DEVICE)

    with pytest.raises(InventoryError, match="device name 'pi-01' is used twice"):
        load_inventory(path)


def test_unknown_top_level_table(tmp_path: Path) -> None:
    message = error_for(tmp_path, "[devices]\n" + GOOD_DEVICE)

    assert message.endswith("unknown field 'devices'; did you mean 'device'?")


def test_no_devices(tmp_path: Path) -> None:
    assert error_for(tmp_path, "[rig]\nsign_count = 5\n").endswith(
        "no devices; add at least one [[device]] table"
    )


def test_sim_power_needs_sim_table() -> None:
    data = {
        "device": [{
            "name": "x", "key": "serial:/dev/ttyACM0", "access": "local",
            "power": {"kind": "sim"},
        }]
    }

    with pytest.raises(InventoryError) as caught:
        parse_inventory(data, Path("rig.toml"))

    assert str(caught.value) == (
        "device 'x': power kind 'sim' needs a 'sim' table naming the simulator"
    )


def test_boolean_where_number_is_due(tmp_path: Path) -> None:
    message = error_for(tmp_path, "[rig]\nsign_count = true\n" + GOOD_DEVICE)

    assert message.endswith("[rig]: field 'sign_count' must be an integer, got a boolean")


# --- transport ----------------------------------------------------------------------------------


def test_ssh_command_line(tmp_path: Path) -> None:
    text = GOOD_DEVICE.replace(
        'user = "pi" }', 'user = "pi", port = 2222, identity_file = "/keys/bench" }'
    )
    device = load_inventory(write(tmp_path, text)).device("pi-01")
    transport = transport_for(device, {"DEVICE_SDK_LOCK_DIR": "/run/hil locks"})

    argv = transport.argv(["provision", "--config", "dir with space/device.toml"])

    assert isinstance(transport, SSHTransport)
    assert argv == [
        "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15",
        "-o", "ServerAliveCountMax=3", "-p", "2222", "-i", "/keys/bench", "pi@pi-01.invalid", "--",
        "env DEVICE_SDK_LOCK_DIR='/run/hil locks' device-sdk provision --config "
        "'dir with space/device.toml'",
    ]
    # The remote shell splits the command back into the original words.
    assert shlex.split(argv[-1]) == [
        "env", "DEVICE_SDK_LOCK_DIR=/run/hil locks", "device-sdk", "provision", "--config",
        "dir with space/device.toml",
    ]


def test_ssh_write_file_keeps_data_off_command_line(tmp_path: Path) -> None:
    device = load_inventory(write(tmp_path, GOOD_DEVICE)).device("pi-01")
    transport = SSHTransport(device)

    argv = transport.write_file_argv(".device-sdk-hil/enrollment-1.token", 0o600)

    assert argv[-1] == (
        "umask 177 && mkdir -p .device-sdk-hil && cat > .device-sdk-hil/enrollment-1.token "
        "&& chmod 600 .device-sdk-hil/enrollment-1.token"
    )
    assert "BatchMode=yes" in argv


def test_local_transport_writes_mode(tmp_path: Path) -> None:
    device = load_inventory(SIM_RIG).devices[0]
    transport = transport_for(device)
    target = tmp_path / "sub" / "token"

    transport.write_file(str(target), b"secret\n", 0o600)

    assert isinstance(transport, LocalTransport)
    assert target.read_bytes() == b"secret\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert transport.argv(["--help"]) == [sys.executable, "-m", "device_sdk", "--help"]


# --- power and report ---------------------------------------------------------------------------


def test_relay_frames() -> None:
    assert relay_frame(1, True) == bytes.fromhex("a00101a2")
    assert relay_frame(1, False) == bytes.fromhex("a00100a1")
    assert relay_frame(2, True) == bytes.fromhex("a00201a3")
    with pytest.raises(ValueError, match="invalid relay channel 0"):
        relay_frame(0, True)


def test_uhubctl_command(tmp_path: Path) -> None:
    text = GOOD_DEVICE.replace(
        'power = { kind = "usb-relay", port = "/dev/ttyUSB3", channel = 2 }',
        'power = { kind = "uhubctl", location = "1-1.2", port = 3 }',
    )
    device = load_inventory(write(tmp_path, text)).device("pi-01")

    assert uhubctl_argv(device.power, False) == ["uhubctl", "-l", "1-1.2", "-p", "3", "-a", "off"]
    assert uhubctl_argv(device.power, True) == ["uhubctl", "-l", "1-1.2", "-p", "3", "-a", "on"]


def test_latency_summary_values() -> None:
    summary = latency_summary([float(value) for value in range(1, 101)])

    assert summary == {
        "count": 100, "min_ms": 1.0, "median_ms": 50.5, "p95_ms": 95.05, "max_ms": 100.0,
    }


# --- the plugin, run as pytest runs it ----------------------------------------------------------


def run_rig(tmp_path: Path, inventory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "hil", "--rig", str(inventory),
         "--report-dir", str(tmp_path / "report"), "-p", "no:cacheprovider", "-q", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env, check=False,
    )


def test_rig_rejects_typo_before_running(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_DEVICE.replace("disposable", "x").replace("access =", "acess ="))

    result = run_rig(tmp_path, path)

    assert result.returncode == 4  # pytest's usage error
    assert "device 'pi-01': unknown field 'acess'; did you mean 'access'?" in result.stderr


def test_rig_skip_names_missing_capability(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_DEVICE)

    result = run_rig(tmp_path, path, "-k", "unplug", "-rs")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "device pi-01 lacks capability 'unplug'" in result.stdout
    suite = ET.parse(tmp_path / "report" / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert suite.get("skipped") == "1"
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    result_entry = report["devices"][0]["scenarios"]["token_unplug_between_signs"]
    assert result_entry["outcome"] == "skipped"
    assert "lacks capability 'unplug'" in result_entry["detail"]
    assert (tmp_path / "report" / "report.md").read_text().count("| pi-01 |") == 2
