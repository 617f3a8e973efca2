"""``device-sdk keys generate`` and ``keys info`` with tpm2: URIs on swtpm, as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_tpm import Swtpm, require_tpm_stack


@pytest.fixture(autouse=True)
def _tpm_stack() -> None:
    require_tpm_stack()


def device_sdk(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_sdk", *args],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["path", "handle"])
def test_keys_generate_and_info_tpm(kind: str, swtpm: Swtpm, tmp_path: Path) -> None:
    blob = tmp_path / "cli.tss2.pem"
    uri = swtpm.path_uri(blob) if kind == "path" else swtpm.handle_uri()
    env = swtpm.environment()

    generated = device_sdk("keys", "generate", uri, "--algorithm", "ec-p256", "--json", env=env)
    info = device_sdk("keys", "info", uri, "--json", env=env)

    assert generated.returncode == 0, generated.stderr
    assert info.returncode == 0, info.stderr
    generated_info = json.loads(generated.stdout)
    shown_info = json.loads(info.stdout)
    assert shown_info == generated_info
    assert shown_info["backend"] == "tpm"
    assert shown_info["hardware_backed"] is True
    assert shown_info["algorithm"] == "ec-p256"
    assert shown_info["never_extractable"] is None
    if kind == "path":
        assert blob.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----\n")


def test_keys_generate_tpm_rejects_ed25519(swtpm: Swtpm, tmp_path: Path) -> None:
    uri = swtpm.path_uri(tmp_path / "ed.tss2.pem")

    completed = device_sdk(
        "keys", "generate", uri, "--algorithm", "ed25519", env=swtpm.environment()
    )

    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == [
        "device-sdk: error: the TPM backend cannot create 'ed25519' keys; choose one of "
        "ec-p256, ec-p384, rsa-pss-2048"
    ]


def test_keys_info_missing_tpm_blob(swtpm: Swtpm, tmp_path: Path) -> None:
    completed = device_sdk(
        "keys", "info", swtpm.path_uri(tmp_path / "absent.pem"), env=swtpm.environment()
    )

    assert completed.returncode == 1
    assert str(tmp_path / "absent.pem") in completed.stderr
    assert "Traceback" not in completed.stderr
