"""`device-sdk provision` killed with SIGKILL at each step, then run again to completion."""

from __future__ import annotations

import signal
import stat

import pytest
from fixtures_provision import ProvisionLab

from device_sdk.config import load_config
from device_sdk.provisioning.run import KILL_AT_ENV
from device_sdk.provisioning.state import STEPS, load_state, state_path_for


@pytest.mark.parametrize("step", STEPS)
def test_killed_at_step_then_resumed(provision_lab: ProvisionLab, step: str) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    config_path = lab.directory / "device.toml"
    args = lab.provision_args(lab.key_uri(token), config_path, lab.enrollment_token_file())

    killed = lab.run(*args, env={KILL_AT_ENV: step})
    resumed = lab.run(*args)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert resumed.returncode == 0, resumed.stderr
    assert lab.count_objects(token)["private_keys"] == 1

    config = load_config(config_path)
    devices = lab.devices()
    assert [d["device_id"] for d in devices] == [config.device_id]
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    state = load_state(state_path_for(config_path))
    assert state is not None and state.finished
    assert state.device_id == config.device_id

    login = lab.login(config_path)
    assert login.returncode == 0, login.stderr
    assert f"device {config.device_id}" in login.stdout


def test_killed_at_every_step_in_turn(provision_lab: ProvisionLab) -> None:
    """One device through seven crashes in a row, one per step, then a clean finish."""
    lab = provision_lab
    token = lab.new_token("edge-01")
    config_path = lab.directory / "device.toml"
    args = lab.provision_args(lab.key_uri(token), config_path, lab.enrollment_token_file())

    for step in STEPS:
        killed = lab.run(*args, env={KILL_AT_ENV: step})
        assert killed.returncode == -signal.SIGKILL, (step, killed.stderr)
        assert lab.count_objects(token)["private_keys"] == 1, step
        assert len(lab.devices()) <= 1, step

    resumed = lab.run(*args)

    assert resumed.returncode == 0, resumed.stderr
    assert lab.count_objects(token)["private_keys"] == 1
    assert [d["device_id"] for d in lab.devices()] == [load_config(config_path).device_id]
    assert lab.login(config_path).returncode == 0
