"""``provision --auto`` key store choice where the TPM backend cannot be imported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from device_sdk.errors import ConfigError
from device_sdk.provisioning.select import KEY_URI_ENV, choose_key


def test_auto_without_tpm2_pytss_skips_tpm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes both `import tpm2_pytss` and find_spec fail, as on a
    # device without the "tpm" extra. The TCTI variable marks a TPM as present.
    monkeypatch.setitem(sys.modules, "tpm2_pytss", None)
    monkeypatch.delitem(sys.modules, "device_sdk.keys.tpm", raising=False)
    monkeypatch.setenv("TPM2TOOLS_TCTI", "swtpm:host=127.0.0.1,port=1")
    monkeypatch.delenv(KEY_URI_ENV, raising=False)

    with pytest.raises(ConfigError, match="--auto found no key store") as caught:
        choose_key(tmp_path / "device.toml", allow_software_key=False)

    assert "no TPM is usable" in str(caught.value)
    assert "device_sdk.keys.tpm" not in sys.modules


def test_auto_without_tpm2_pytss_falls_back_to_softhsm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tpm2_pytss", None)
    monkeypatch.setenv("TPM2TOOLS_TCTI", "swtpm:host=127.0.0.1,port=1")
    monkeypatch.delenv(KEY_URI_ENV, raising=False)
    monkeypatch.delenv("SOFTHSM2_CONF", raising=False)

    choice = choose_key(tmp_path / "device.toml", allow_software_key=True)

    assert choice.uri.startswith("pkcs11:token=device-sdk;")
    assert choice.source == f"SoftHSM token store {tmp_path / 'softhsm'}"
