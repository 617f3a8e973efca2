"""The rig's scenarios, each run once per inventory device (see ``hil/conftest.py``).

pytest runs them in this file's order: provisioning first, then the logins and measurements on
the provisioned device, and the destructive power scenarios last, because they erase the token.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from hil.report import latency_summary
from hil.rig import DeviceHandle, DeviceInUseError, ProvisionRun, Rig

RECONNECT_TIMEOUT = 90.0
RECOVERY_TIMEOUT = 30.0
DEVICE_ID = re.compile(r"provisioned device ([A-Za-z0-9_-]{43})")


def _provision_fresh(device: DeviceHandle, rig: Rig) -> ProvisionRun:
    """Erase a disposable device if its token contains keys, then provision it from scratch."""
    try:
        device.require_blank()
    except DeviceInUseError as exc:
        pytest.skip(f"refused: {exc}")
    token_file = device.new_enrollment_token()
    run = device.provision(token_file, device.device.capabilities.algorithms[0])
    assert run.status == 0, f"device-sdk provision failed:\n{run.stdout}\n{run.stderr}"
    _mark_provisioned(device, run)
    return run


def _mark_provisioned(device: DeviceHandle, run: ProvisionRun) -> None:
    match = DEVICE_ID.search(run.stdout)
    assert match is not None, f"no device id in the provision output:\n{run.stdout}"
    device.device_id = match.group(1)
    device.provisioned = True


def _registry_ids(rig: Rig) -> list[str]:
    return [str(record["device_id"]) for record in rig.services.registry()]


@pytest.fixture
def provisioned(device: DeviceHandle) -> DeviceHandle:
    """The device, provisioned by the provision scenario or now."""
    if not device.provisioned:
        _provision_fresh(device, device.rig)
    return device


def _ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["ok"], f"{reply.get('op')} failed: {reply.get('error_type')}: {reply.get('error')}"
    return reply


# --- scenarios --------------------------------------------------------------------------------


@pytest.mark.destructive
def test_provision(device: DeviceHandle) -> None:
    rig = device.rig
    run = _provision_fresh(device, rig)

    rig.record(device.name, "provision", seconds=round(run.seconds, 3), device_id=device.device_id)
    assert device.device_id is not None
    assert _registry_ids(rig).count(device.device_id) == 1
    labels = device.key_labels()
    if labels is not None:
        assert len(labels) == 1, f"the token contains {labels} after one provisioning"


def test_http_login(provisioned: DeviceHandle) -> None:
    rig = provisioned.rig
    with provisioned.agent() as agent:
        reply = _ok(agent.call("http-login"))

    rig.record(provisioned.name, "http_login", ms=reply["ms"], expires_in=reply["expires_in"])
    assert reply["expires_in"] > 0


def test_mqtt_login(provisioned: DeviceHandle) -> None:
    rig = provisioned.rig
    with provisioned.agent() as agent:
        reply = _ok(agent.call("mqtt-connect"))

    rig.record(provisioned.name, "mqtt_login", ms=reply["ms"], channel_bound=reply["channel_bound"])
    # The rig's broker serves TLS, so the assertion must carry the broker certificate's hash.
    assert reply["channel_bound"] is True


def test_reconnect_after_broker_restart(provisioned: DeviceHandle) -> None:
    rig = provisioned.rig
    with provisioned.agent() as agent:
        started = _ok(agent.call("mqtt-start", timeout=30))
        assert started["connected"], f"the MQTT client did not connect: {started}"
        first = started["last_connected_attempt"]

        rig.services.restart_broker()
        restarted = time.monotonic()
        reply = _ok(
            agent.call(
                "mqtt-wait",
                after=first,
                timeout=RECONNECT_TIMEOUT,
                reply_timeout=RECONNECT_TIMEOUT + 30,
            )
        )
        reconnect_s = round(time.monotonic() - restarted, 3)
        _ok(agent.call("mqtt-stop"))

    rig.record(
        provisioned.name,
        "reconnect_after_broker_restart",
        reconnect_s=reconnect_s,
        attempts=reply["attempts"],
        outcomes=reply["outcomes"],
    )
    assert reply["connected"], f"no reconnect within {RECONNECT_TIMEOUT:.0f} s: {reply}"
    assert reply["last_connected_attempt"] > first


def test_sign_latency(provisioned: DeviceHandle) -> None:
    rig = provisioned.rig
    with provisioned.agent() as agent:
        hello = _ok(agent.call("hello"))
        _ok(agent.call("sign", count=3))  # warm-up: login and key handle lookup
        reply = _ok(agent.call("sign", count=rig.sign_count, reply_timeout=600))

    assert len(reply["latencies_ms"]) == rig.sign_count
    rig.record(
        provisioned.name,
        "sign_latency",
        backend=hello["backend"],
        hardware_backed=hello["hardware_backed"],
        algorithm=hello["algorithm"],
        sign=latency_summary(reply["latencies_ms"]),
    )


def test_connect_latency(provisioned: DeviceHandle) -> None:
    rig = provisioned.rig
    mqtt: list[float] = []
    http: list[float] = []
    with provisioned.agent() as agent:
        for _ in range(rig.connect_count):
            mqtt.append(_ok(agent.call("mqtt-connect"))["ms"])
            http.append(_ok(agent.call("http-login"))["ms"])

    rig.record(
        provisioned.name,
        "connect_latency",
        mqtt_connect=latency_summary(mqtt),
        http_login=latency_summary(http),
    )


@pytest.mark.needs("unplug")
def test_token_unplug_between_signs(provisioned: DeviceHandle) -> None:
    rig = provisioned.rig
    switch = provisioned.switch
    assert switch is not None
    with provisioned.agent() as agent:
        before = _ok(agent.call("hello"))
        _ok(agent.call("sign", count=1))

        switch.off()
        unplugged = agent.call("sign", count=1, reply_timeout=60)
        switch.on()

        replugged = time.monotonic()
        deadline = replugged + RECOVERY_TIMEOUT
        errors: list[str] = []
        while True:
            reply = agent.call("sign", count=1, reply_timeout=60)
            if reply["ok"] or time.monotonic() > deadline:
                break
            errors.append(f"{reply['error_type']}: {reply['error']}")
            time.sleep(0.2)
        recovery_s = round(time.monotonic() - replugged, 3)
        after = agent.call("hello")

    rig.record(
        provisioned.name,
        "token_unplug_between_signs",
        recovery_s=recovery_s,
        unplugged_error=unplugged.get("error_type"),
        errors_after_replug=errors[:5],
    )
    assert not unplugged["ok"], "a sign succeeded while the token was unplugged"
    assert reply["ok"], (
        f"no successful sign within {RECOVERY_TIMEOUT:.0f} s of replug: {errors[-3:]}"
    )
    assert _ok(after)["device_id"] == before["device_id"]


@pytest.mark.needs("counter")
def test_counter_survives_power_cycle(provisioned: DeviceHandle) -> None:
    """The monotonic counter grows by one per increment, and keeps growing after a power cycle."""
    rig = provisioned.rig
    power = provisioned.device.capabilities.power
    with provisioned.agent() as agent:
        first = _ok(agent.call("counter"))["value"]
        second = _ok(agent.call("counter"))["value"]

        after_cycle = None
        if power:
            assert provisioned.switch is not None
            provisioned.switch.off()
            provisioned.switch.on()
            deadline = time.monotonic() + RECOVERY_TIMEOUT
            while after_cycle is None and time.monotonic() < deadline:
                reply = agent.call("counter", reply_timeout=60)
                after_cycle = reply["value"] if reply["ok"] else None

    rig.record(
        provisioned.name, "counter_survives_power_cycle", values=[first, second, after_cycle]
    )
    assert second == first + 1
    if power:
        assert after_cycle is not None, (
            f"no counter read within {RECOVERY_TIMEOUT:.0f} s of power on"
        )
        assert after_cycle > second


@pytest.mark.destructive
@pytest.mark.needs("power")
@pytest.mark.parametrize("cut_after", ["key", "enroll"])
def test_power_cut_during_provisioning(device: DeviceHandle, cut_after: str) -> None:
    """Cut the power once the step ``cut_after`` is done; the resumed run must finish the job."""
    rig = device.rig
    switch = device.switch
    assert switch is not None
    try:
        device.require_blank()
    except DeviceInUseError as exc:
        pytest.skip(f"refused: {exc}")
    registry_before = _registry_ids(rig)
    token_file = device.new_enrollment_token()
    algorithm = device.device.capabilities.algorithms[0]

    def cut(process: Any) -> None:
        switch.off()
        # On a board the power cut ends the process; a local process is killed to match.
        device.kill_process_group(process)

    cut_run = device.provision(token_file, algorithm, cut_after=cut_after, on_cut=cut)
    switch.on()
    assert cut_run.killed_after == cut_after, (
        f"the run never reached {cut_after}:\n{cut_run.stdout}"
    )
    assert cut_run.status != 0

    resumed = device.provision(token_file, algorithm)
    assert resumed.status == 0, f"the resumed run failed:\n{resumed.stdout}\n{resumed.stderr}"
    _mark_provisioned(device, resumed)

    registry_after = _registry_ids(rig)
    labels = device.key_labels()
    rig.record(
        device.name,
        f"power_cut_during_provisioning[{cut_after}]",
        resumed_seconds=round(resumed.seconds, 3),
        keys=labels,
        new_registry_entries=len(registry_after) - len(registry_before),
    )
    assert "resuming" in resumed.stdout, f"the second run did not resume:\n{resumed.stdout}"
    assert device.device_id is not None
    assert registry_after.count(device.device_id) == 1
    assert len(registry_after) == len(registry_before) + 1
    if labels is not None:
        assert len(labels) == 1, f"the token contains {labels} after the resumed run"
    else:
        assert device.key_opens()
