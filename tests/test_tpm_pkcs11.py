"""The tpm2-pkcs11 route: a PKCS#11 token backed by the TPM, used by the PKCS#11 backend.

tpm2_ptool creates the token and key on swtpm behind tpm2-abrmd. The PKCS#11 module reads
TPM2_PKCS11_STORE and TPM2_PKCS11_TCTI when it is loaded, so the SDK runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fixtures_tpm import Abrmd, require_tpm_stack

TPM2_PKCS11_MODULE = Path("/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so")
TOOLS_INSTALL = "apt install libtpm2-pkcs11-1 libtpm2-pkcs11-tools python3-tpm2-pkcs11-tools"
SYSTEM_PYTHON = "/usr/bin/python3"

# tpm2_ptool takes PINs only as arguments, so this wrapper appends them from the environment:
# they then never appear on a command line that other users can read in /proc.
PTOOL = textwrap.dedent(
    """
    import os, sys
    from tpm2_pkcs11.tpm2_ptool import main
    arguments = sys.argv[1:]
    for option, variable in (("--userpin", "PTOOL_USER_PIN"), ("--sopin", "PTOOL_SO_PIN")):
        if option in arguments:
            arguments[arguments.index(option)] = f"{option}={os.environ[variable]}"
    sys.argv = ["tpm2_ptool", *arguments]
    sys.exit(main())
    """
)

SIGNER = textwrap.dedent(
    """
    import json, sys
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from device_sdk.keys import open_key
    key = open_key(sys.argv[1])
    signatures = [
        key.sign(b"message %d" % index, ec.ECDSA(hashes.SHA256())).hex() for index in range(20)
    ]
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    print(json.dumps({
        "backend": key.backend, "hardware_backed": key.hardware_backed,
        "device_id": key.device_id, "public_key": public.decode(), "signatures": signatures,
    }))
    """
)


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tpm_stack()
    if not TPM2_PKCS11_MODULE.exists():
        pytest.skip(f"the tpm2-pkcs11 module is not installed; install it with: {TOOLS_INSTALL}")
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import tpm2_pkcs11.tpm2_ptool"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"tpm2_ptool is not installed; install it with: {TOOLS_INSTALL}")


@dataclass
class TpmToken:
    label: str
    key_label: str
    store: Path
    pin_file: Path
    env: dict[str, str]

    @property
    def key_uri(self) -> str:
        return (
            f"pkcs11:token={self.label};object={self.key_label};type=private"
            f"?module-path={TPM2_PKCS11_MODULE}&pin-source=file:{self.pin_file}"
        )


def ptool(env: dict[str, str], *arguments: str) -> str:
    completed = subprocess.run(
        [SYSTEM_PYTHON, "-c", PTOOL, *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, f"tpm2_ptool {arguments[0]}: {completed.stderr}"
    return completed.stdout


@pytest.fixture(scope="module")
def tpm_token(tpm_abrmd: Abrmd, tmp_path_factory: pytest.TempPathFactory) -> TpmToken:
    directory = tmp_path_factory.mktemp("tpm2-pkcs11")
    store = directory / "store"
    store.mkdir(mode=0o700)
    user_pin = "4711-user"
    pin_file = directory / "user.pin"
    descriptor = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(user_pin)

    env = tpm_abrmd.environment()
    env.update(
        TPM2_PKCS11_STORE=str(store),
        TPM2_PKCS11_TCTI=tpm_abrmd.tcti,
        PTOOL_USER_PIN=user_pin,
        PTOOL_SO_PIN="4711-so",
    )
    ptool(env, "init", f"--path={store}")
    ptool(
        env, "addtoken", "--pid=1", "--label=tpm-token", "--userpin", "--sopin", f"--path={store}"
    )
    ptool(
        env, "addkey", "--label=tpm-token", "--key-label=device-key", "--algorithm=ecc256",
        "--userpin", f"--path={store}",
    )  # fmt: skip
    for name in ("PTOOL_USER_PIN", "PTOOL_SO_PIN"):
        del env[name]
    return TpmToken("tpm-token", "device-key", store, pin_file, env)


def run_signer(token: TpmToken) -> dict[str, object]:
    completed = subprocess.run(
        [sys.executable, "-c", SIGNER, token.key_uri],
        capture_output=True,
        text=True,
        env=token.env,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, object] = json.loads(completed.stdout)
    return result


def test_pkcs11_backend_signs_with_tpm2_pkcs11(tpm_token: TpmToken) -> None:
    result = run_signer(tpm_token)

    public_key = serialization.load_pem_public_key(str(result["public_key"]).encode())
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert result["backend"] == "pkcs11"
    assert result["hardware_backed"] is True
    signatures = result["signatures"]
    assert isinstance(signatures, list)
    assert len(signatures) == 20
    for index, signature in enumerate(signatures):
        public_key.verify(
            bytes.fromhex(signature), b"message %d" % index, ec.ECDSA(hashes.SHA256())
        )


def test_tpm2_pkcs11_key_stable_across_processes(tpm_token: TpmToken) -> None:
    first = run_signer(tpm_token)
    second = run_signer(tpm_token)

    assert first["device_id"] == second["device_id"]


GENERATOR = textwrap.dedent(
    """
    import json, sys
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from device_sdk.keys import pkcs11
    key = pkcs11.generate_key(sys.argv[1], "ec-p256")
    signature = key.sign(b"generated", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, b"generated", ec.ECDSA(hashes.SHA256()))
    print(json.dumps({"policy": pkcs11.key_policy(key), "device_id": key.device_id}))
    """
)


@pytest.mark.xfail(
    strict=True,
    reason="tpm2-pkcs11 1.9.0 makes every P-256 key sign-and-decrypt and rejects a template that "
    "disagrees: CKR_GENERAL_ERROR with 'User specified and TPM specified attr mismatch' for "
    "CKA_VERIFY (0x10a, python-pkcs11 puts VERIFY=false in the private template) and then "
    "CKA_DECRYPT (0x105, the backend asks for DECRYPT=false); make keys with tpm2_ptool addkey",
)
def test_pkcs11_backend_generates_on_tpm_token(tpm_token: TpmToken) -> None:
    uri = tpm_token.key_uri.replace("object=device-key;type=private", "object=made-by-sdk")

    completed = subprocess.run(
        [sys.executable, "-c", GENERATOR, uri],
        capture_output=True,
        text=True,
        env=tpm_token.env,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    policy = json.loads(completed.stdout)["policy"]
    assert policy["extractable"] is False
    assert policy["never_extractable"] is True
    assert policy["always_sensitive"] is True

