"""``provision --auto`` key store choice where the TPM backend cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from device_sdk.errors import ConfigError
from device_sdk.provisioning.select import KEY_URI_ENV, choose_key


def test_auto_without_tpm2_pytss_skips_tpm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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


# Runs in a child process: creating the SoftHSM store initialises SoftHSM with its config, and a
# process reads SOFTHSM2_CONF only once, so the test process must keep the session's store.
CHOOSE_WITHOUT_PYTSS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.modules["tpm2_pytss"] = None
    from device_sdk.provisioning.select import choose_key
    choice = choose_key(Path(sys.argv[1]), allow_software_key=True)
    print(json.dumps({"uri": choice.uri, "source": choice.source}))
    """
)


def test_auto_without_tpm2_pytss_falls_back_to_softhsm(tmp_path: Path) -> None:
    removed = ("SOFTHSM2_CONF", KEY_URI_ENV)
    env = {name: value for name, value in os.environ.items() if name not in removed}
    env["TPM2TOOLS_TCTI"] = "swtpm:host=127.0.0.1,port=1"

    completed = subprocess.run(
        [sys.executable, "-c", CHOOSE_WITHOUT_PYTSS, str(tmp_path / "device.toml")],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr
    choice = json.loads(completed.stdout)
    assert choice["uri"].startswith("pkcs11:token=device-sdk;")
    assert choice["source"] == f"SoftHSM token store {tmp_path / 'softhsm'}"
