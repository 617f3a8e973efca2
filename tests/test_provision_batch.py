"""`device-sdk provision --batch`: 20 rows, two of them bad, then re-runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fixtures_provision import ProvisionLab

from device_sdk.provisioning.state import state_path_for

ROWS = 20
MISSING_TOKEN_ROW = 5
WRONG_PIN_ROW = 12


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _write_manifest(lab: ProvisionLab) -> Path:
    """Write 20 rows: even rows by key URI, odd rows by token label with a pin_file column."""
    lines = ["# 20 devices for the batch test", "key,pin_file,enrollment_token_file,config"]
    for row in range(1, ROWS + 1):
        label = f"edge-{row:02d}"
        token_file = lab.enrollment_token_file(f"row-{row:02d}")
        config = f"configs/{label}.toml"
        if row == MISSING_TOKEN_ROW:
            pin_file = lab.directory / "missing.pin"
            _write_secret(pin_file, "1234\n")
            lines.append(f"{label},{pin_file},{token_file},{config}")
            continue
        token = lab.new_token(label)
        if row == WRONG_PIN_ROW:
            pin_file = lab.directory / "wrong.pin"
            _write_secret(pin_file, "not-the-pin\n")
            lines.append(f"{label},{pin_file},{token_file},{config}")
        elif row % 2 == 0:
            lines.append(f'"{lab.key_uri(token)}",,{token_file},{config}')
        else:
            lines.append(f"{label},{token.user_pin_file},{token_file},{config}")
    manifest = lab.directory / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    (lab.directory / "configs").mkdir()
    return manifest


def _batch(lab: ProvisionLab, manifest: Path) -> tuple[int, dict[str, object], str]:
    completed = lab.run(
        "provision",
        "--batch",
        str(manifest),
        "--verifier",
        lab.verifier_url,
        "--allow-software-key",
        "--json",
        timeout=300,
    )
    report: dict[str, object] = json.loads(completed.stdout)
    return completed.returncode, report, completed.stderr


def test_batch_twenty_rows_two_bad(provision_lab: ProvisionLab) -> None:
    lab = provision_lab
    manifest = _write_manifest(lab)

    status, report, stderr = _batch(lab, manifest)

    assert status == 1
    assert report["summary"] == {"total": 20, "provisioned": 18, "skipped": 0, "failed": 2}
    rows = report["rows"]
    assert isinstance(rows, list)
    failed = {r["row"]: r for r in rows if r["status"] == "failed"}
    assert sorted(failed) == [MISSING_TOKEN_ROW, WRONG_PIN_ROW]
    missing, wrong_pin = failed[MISSING_TOKEN_ROW], failed[WRONG_PIN_ROW]
    assert missing["step"] == "key"
    assert missing["error_type"] == "TokenNotPresentError"
    assert "edge-05" in missing["error"]
    assert wrong_pin["step"] == "key"
    assert wrong_pin["error_type"] == "PinIncorrectError"
    assert "CKR_PIN_INCORRECT" in wrong_pin["error"]
    assert "edge-12" in wrong_pin["error"]
    assert len(lab.devices()) == 18
    # Non-tty progress: one plain line per row, no carriage returns.
    assert "\r" not in stderr
    assert stderr.count("row ") >= 20
    report_file = json.loads((manifest.parent / "manifest.csv.report.json").read_text())
    assert report_file["summary"] == report["summary"]

    done_states = {
        row: state_path_for(lab.directory / f"configs/edge-{row:02d}.toml").stat().st_mtime_ns
        for row in range(1, ROWS + 1)
        if row not in failed
    }
    status, second, _ = _batch(lab, manifest)

    assert status == 1
    assert second["summary"] == {"total": 20, "provisioned": 0, "skipped": 18, "failed": 2}
    second_rows = second["rows"]
    assert isinstance(second_rows, list)
    assert sorted(r["row"] for r in second_rows if r["status"] == "failed") == [5, 12]
    for row, mtime in done_states.items():
        state_path = state_path_for(lab.directory / f"configs/edge-{row:02d}.toml")
        assert state_path.stat().st_mtime_ns == mtime, row

    # Fix both rows: create the missing token, give the right PIN. Only they are provisioned.
    created = lab.new_token("edge-05")
    _write_secret(lab.directory / "missing.pin", created.user_pin_file.read_text())
    _write_secret(lab.directory / "wrong.pin", lab.tokens["edge-12"].user_pin_file.read_text())

    status, third, _ = _batch(lab, manifest)

    assert status == 0
    assert third["summary"] == {"total": 20, "provisioned": 2, "skipped": 18, "failed": 0}
    assert len(lab.devices()) == 20
    for label, token in lab.tokens.items():
        assert lab.count_objects(token)["private_keys"] == 1, label
