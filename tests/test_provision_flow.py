"""`device-sdk provision` and `device-sdk info` against SoftHSM and a running verifier."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_provision import ProvisionLab

from device_sdk.config import load_config
from device_sdk.provisioning.keystore import KeyReference
from device_sdk.provisioning.lock import exclusive_lock, lock_path_for
from device_sdk.provisioning.state import STEPS, load_state, state_path_for


def _json(completed: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert completed.returncode == 0, completed.stderr
    result: dict[str, object] = json.loads(completed.stdout)
    return result


def _ok(completed: subprocess.CompletedProcess[str]) -> None:
    assert completed.returncode == 0, completed.stderr


def test_provision_new_token(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    config_path = lab.directory / "device.toml"

    completed = lab.run(
        *lab.provision_args(
            lab.key_uri(token),
            config_path,
            lab.enrollment_token_file(),
            "--json",
            "--broker",
            "mqtt://127.0.0.1:1883",
        )
    )
    result = _json(completed)

    config = load_config(config_path)
    assert result["device_id"] == config.device_id
    assert result["backend"] == "softhsm"
    assert result["hardware_backed"] is False
    assert result["key_generated"] is True
    assert result["reused_key"] is False
    assert [s["step"] for s in result["steps"]] == list(STEPS)  # type: ignore[union-attr]
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    assert config.hardware_backed is False
    assert config.software_key_allowed is True
    assert config.broker_url == "mqtt://127.0.0.1:1883"
    assert config.pin_source == f"file:{token.user_pin_file}"
    assert "pin-value" not in config_path.read_text()

    devices = lab.devices()
    assert [d["device_id"] for d in devices] == [config.device_id]
    assert devices[0]["hardware_backed"] is False
    assert devices[0]["backend"] == "softhsm"
    assert lab.count_objects(token) == {"private_keys": 1, "certificates": 0}

    state = load_state(state_path_for(config_path))
    assert state is not None and state.finished
    login = lab.login(config_path)
    assert login.returncode == 0, login.stderr


def test_provision_rerun_keeps_one_key(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    config_path = lab.directory / "device.toml"
    token_file = lab.enrollment_token_file()
    first = _json(
        lab.run(*lab.provision_args(lab.key_uri(token), config_path, token_file, "--json"))
    )

    second = _json(
        lab.run(*lab.provision_args(lab.key_uri(token), config_path, token_file, "--json"))
    )

    assert second["device_id"] == first["device_id"]
    statuses = {s["step"]: s["status"] for s in second["steps"]}  # type: ignore[union-attr]
    assert statuses["csr"] == "recorded"
    assert statuses["enroll"] == "recorded"
    assert statuses["config"] == "recorded"
    assert statuses["login"] == "done"
    assert lab.count_objects(token)["private_keys"] == 1
    assert len(lab.devices()) == 1


def test_enrollment_token_reuse_by_other_key_rejected(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    first, second = lab.new_token("edge-01"), lab.new_token("edge-02")
    token_file = lab.enrollment_token_file()
    _ok(lab.run(*lab.provision_args(lab.key_uri(first), lab.directory / "a.toml", token_file)))

    completed = lab.run(
        *lab.provision_args(lab.key_uri(second), lab.directory / "b.toml", token_file)
    )

    assert completed.returncode == 1
    assert "enroll: the verifier at" in completed.stderr
    assert "rejected the enrollment token (HTTP 401)" in completed.stderr
    assert "already used by another key" in completed.stderr
    assert len(lab.devices()) == 1
    assert not (lab.directory / "b.toml").exists()
    token_text = token_file.read_text().strip()
    assert token_text not in completed.stderr + completed.stdout


def test_enrolled_key_reused_and_reported(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    first = _json(
        lab.run(
            *lab.provision_args(
                lab.key_uri(token),
                lab.directory / "a.toml",
                lab.enrollment_token_file(),
                "--json",
            )
        )
    )
    unused_token_file = lab.enrollment_token_file()

    completed = lab.run(
        *lab.provision_args(lab.key_uri(token), lab.directory / "b.toml", unused_token_file)
    )

    assert completed.returncode == 0, completed.stderr
    assert f"device {first['device_id']} is already enrolled" in completed.stdout
    assert "reusing the enrolled key; the enrollment token was not used" in completed.stdout
    assert "the token already held this key; it was reused, not replaced" in completed.stdout
    assert load_config(lab.directory / "b.toml").device_id == first["device_id"]
    assert lab.count_objects(token)["private_keys"] == 1
    assert len(lab.devices()) == 1

    # The enrollment token was left unspent, so another device can still use it.
    other = lab.new_token("edge-02")
    again = lab.run(
        *lab.provision_args(lab.key_uri(other), lab.directory / "c.toml", unused_token_file)
    )
    assert again.returncode == 0, again.stderr
    assert len(lab.devices()) == 2


def test_software_key_needs_flag(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    args = lab.provision_args(
        lab.key_uri(token), lab.directory / "d.toml", lab.enrollment_token_file()
    )
    args.remove("--allow-software-key")

    completed = lab.run(*args)

    assert completed.returncode == 1
    assert "is a software key store (SoftHSM)" in completed.stderr
    assert "pass --allow-software-key" in completed.stderr
    assert lab.count_objects(token)["private_keys"] == 0
    assert lab.devices() == []


def test_pin_value_in_uri_rejected(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    uri = f"pkcs11:token=edge-01;object=k?pin-value=123456&module-path={token.module_path}"

    completed = lab.run(
        *lab.provision_args(uri, lab.directory / "d.toml", lab.enrollment_token_file())
    )

    assert completed.returncode == 1
    assert "contains a pin-value" in completed.stderr
    assert "123456" not in completed.stderr


def test_lock_held_names_pid(provision_lab: ProvisionLab, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    uri = lab.key_uri(token)
    monkeypatch.setenv("SOFTHSM2_CONF", lab.env["SOFTHSM2_CONF"])
    lock_path = lock_path_for(
        KeyReference.parse(uri).lock_name, Path(lab.env["DEVICE_SDK_LOCK_DIR"])
    )

    with exclusive_lock(lock_path, what="token 'edge-01'"):
        completed = lab.run(
            *lab.provision_args(uri, lab.directory / "d.toml", lab.enrollment_token_file())
        )

    assert completed.returncode == 1
    assert "token 'edge-01' is being provisioned by another run" in completed.stderr
    assert f"PID {os.getpid()}" in completed.stderr
    assert str(lock_path) in completed.stderr
    assert lab.count_objects(token)["private_keys"] == 0


def test_two_runs_at_once_make_one_key(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    uri = lab.key_uri(token)
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "device_sdk",
                *lab.provision_args(
                    uri, lab.directory / f"{name}.toml", lab.enrollment_token_file()
                ),
            ],
            env=lab.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [run.communicate(timeout=120) for run in runs]

    statuses = sorted(run.returncode for run in runs)
    assert statuses in ([0, 0], [0, 1])
    for run, (_, stderr) in zip(runs, outputs, strict=True):
        if run.returncode == 1:
            assert "is being provisioned by another run (PID" in stderr
    assert lab.count_objects(token)["private_keys"] == 1
    assert len(lab.devices()) == 1


def test_info_reports_device(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    token = lab.new_token("edge-01")
    config_path = lab.directory / "device.toml"
    _ok(
        lab.run(
            *lab.provision_args(
                lab.key_uri(token),
                config_path,
                lab.enrollment_token_file(),
                "--broker",
                "mqtt://127.0.0.1:9",
            )
        )
    )

    completed = lab.run("info", "--config", str(config_path), "--json")

    assert completed.returncode == 1
    info = json.loads(completed.stdout)
    assert info["device_id"] == load_config(config_path).device_id
    assert info["backend"] == "softhsm"
    assert info["hardware_backed"] is False
    assert info["certificate"]["location"] is None
    assert info["verifier"]["reachable"] is True
    assert info["verifier"]["detail"] == "HTTP 200"
    assert info["broker"]["reachable"] is False
    assert info["ok"] is False
    assert info["problems"][0].startswith("broker mqtt://127.0.0.1:9 is unreachable")


def test_auto_without_software_key_fails(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    config_path = lab.directory / "auto" / "device.toml"

    completed = lab.run(
        "provision",
        "--auto",
        "--verifier",
        lab.verifier_url,
        "--enrollment-token-file",
        str(lab.enrollment_token_file()),
        "--config",
        str(config_path),
        env={"DEVICE_SDK_KEY_URI": ""},
    )

    assert completed.returncode == 1
    assert "--auto found no key store" in completed.stderr
    assert "add --allow-software-key to use SoftHSM" in completed.stderr
    assert lab.devices() == []


def test_auto_falls_back_to_softhsm(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    config_path = lab.directory / "auto" / "device.toml"
    config_path.parent.mkdir()
    env = {key: value for key, value in lab.env.items() if key != "SOFTHSM2_CONF"}
    args = [
        sys.executable,
        "-m",
        "device_sdk",
        "provision",
        "--auto",
        "--allow-software-key",
        "--verifier",
        lab.verifier_url,
        "--enrollment-token-file",
        str(lab.enrollment_token_file()),
        "--config",
        str(config_path),
        "--json",
    ]

    completed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)

    result = _json(completed)
    store_conf = config_path.parent / "softhsm" / "softhsm2.conf"
    assert f"to use this key later, export SOFTHSM2_CONF={store_conf}" in result["messages"]
    assert result["backend"] == "softhsm"
    assert result["hardware_backed"] is False
    config = load_config(config_path)
    assert config.software_key_allowed is True
    assert "token=device-sdk" in config.key_uri
    assert [d["device_id"] for d in lab.devices()] == [config.device_id]

    # A re-run with --auto keeps the configured key.
    again = subprocess.run(
        args,
        env={**env, "SOFTHSM2_CONF": str(store_conf)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    second = _json(again)
    assert second["device_id"] == config.device_id
    assert any(f"from the existing config {config_path}" in m for m in second["messages"])
    assert len(lab.devices()) == 1
