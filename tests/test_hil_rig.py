"""The rig run end to end on a SoftHSM device: refusal of a device in use, the report files, and a
device whose simulator does not start.

These start the rig's verifier and broker, so each takes some seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

SOFTHSM_DEVICE = """
[rig]
sign_count = 20

[[device]]
name = "token-in-use"
key = "pkcs11:token=hil-t;object=device-key;type=private?pin-source=file:{state}/hil-t.user-pin"
access = "local"
software_key = true
disposable = false
sim = { kind = "softhsm", token = "hil-t" }
power = { kind = "sim", settle = 0 }
capabilities = { power = true }
"""


def run_rig(
    tmp_path: Path, *args: str, inventory_text: str = SOFTHSM_DEVICE
) -> subprocess.CompletedProcess[str]:
    inventory = tmp_path / "rig.toml"
    inventory.write_text(inventory_text)
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "hil", "--rig", str(inventory),
         "--report-dir", str(tmp_path / "report"), "-p", "no:cacheprovider", "-q", "-rs",
         "--basetemp", str(tmp_path / "base"), *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env, check=False,
    )


@pytest.mark.slow
def test_destructive_scenario_refuses_device_in_use(tmp_path: Path) -> None:
    # The provision scenario leaves a key on the token; the power-cut scenarios then meet a
    # token in use on a device that is not disposable.
    result = run_rig(tmp_path, "-k", "test_provision or power_cut or sign_latency")

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "2 passed, 2 skipped" in result.stdout, output
    assert (
        "refused: device token-in-use: the token contains keys ['device-key'] and the device is "
        "not marked disposable; set disposable = true in the inventory to let the rig erase it"
    ) in result.stdout

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    scenarios = report["devices"][0]["scenarios"]
    assert scenarios["provision"]["outcome"] == "passed"
    assert scenarios["power_cut_during_provisioning[key]"]["outcome"] == "skipped"
    assert scenarios["power_cut_during_provisioning[enroll]"]["outcome"] == "skipped"
    sign = scenarios["sign_latency"]["metrics"]["sign"]
    assert sign["count"] == 20
    assert 0 < sign["min_ms"] <= sign["median_ms"] <= sign["p95_ms"] <= sign["max_ms"]

    suite = ET.parse(tmp_path / "report" / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert suite.get("tests") == "4"
    assert suite.get("skipped") == "2"
    svg = ET.parse(tmp_path / "report" / "latency.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert "token-in-use sign" in (tmp_path / "report" / "latency.svg").read_text()
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| token-in-use | softhsm |" in markdown
    assert (tmp_path / "report" / "logs" / "services-verifier.log").exists()


BROKEN_SIMULATOR = """
[[device]]
name = "shim-bad-slots"
key = "serial:{tty}?slot=0"
access = "local"
software_key = true
sim = { kind = "firmware-shim", slots = 300 }
"""


@pytest.mark.slow
def test_device_setup_failure_fails_only_that_device(tmp_path: Path) -> None:
    # The simulator accepts 1 to 255 slots, so this device never starts; the other one runs.
    inventory = SOFTHSM_DEVICE + BROKEN_SIMULATOR
    result = run_rig(tmp_path, "-k", "http_login", inventory_text=inventory)

    assert result.returncode == 1, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("1 passed, "), summary
    assert ", 1 error in " in summary
    assert "device shim-bad-slots could not be set up: SimulatorError: device shim-bad-slots:" in (
        result.stdout
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    outcomes = {
        device["name"]: device["scenarios"]["http_login"]["outcome"]
        for device in report["devices"]
    }
    assert outcomes == {"token-in-use": "passed", "shim-bad-slots": "error"}
