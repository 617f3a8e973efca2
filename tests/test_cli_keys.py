"""The ``device-sdk softhsm`` and ``device-sdk keys`` commands, run as real subprocesses."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from fixtures_softhsm import unique_label

from device_sdk.errors import KeyExportError
from device_sdk.keys import pkcs11 as backend

MESSAGE = b"signed by a key made with the CLI"


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_sdk", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def test_softhsm_init_json(tmp_path, softhsm_env):
    store = tmp_path / "store"

    completed = _cli("softhsm", "init", "--dir", str(store), "--label", "edge-01", "--json",
                     env=softhsm_env)

    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["label"] == "edge-01"
    assert result["conf"] == str(store / "softhsm2.conf")
    assert result["softhsm2_conf"] == str(store / "softhsm2.conf")
    assert result["export"] == f"export SOFTHSM2_CONF={store / 'softhsm2.conf'}"
    assert result["user_pin_file"] == str(store / "edge-01.user-pin")
    assert result["uri"].startswith(f"pkcs11:token=edge-01;serial={result['serial']}?")
    for name in ("user_pin_file", "so_pin_file"):
        path = Path(result[name])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text() not in completed.stdout + completed.stderr
    listing = subprocess.run(
        ["softhsm2-util", "--show-slots"], env={**softhsm_env, "SOFTHSM2_CONF": result["conf"]},
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert f"Serial number:    {result['serial']}" in listing


def test_softhsm_init_creates_missing_parents(tmp_path, softhsm_env):
    store = tmp_path / "a" / "b"

    completed = _cli("softhsm", "init", "--dir", str(store), "--label", "x", "--json",
                     env=softhsm_env)

    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["softhsm2_conf"] == str(store / "softhsm2.conf")
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.parent.stat().st_mode) == 0o700


def test_softhsm_init_parent_is_file(tmp_path, softhsm_env):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")

    completed = _cli("softhsm", "init", "--dir", str(blocker / "store"), "--label", "x",
                     env=softhsm_env)

    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == [
        f"device-sdk: error: cannot create token store {blocker / 'store'}: {blocker} is not "
        "a directory; choose another --dir"
    ]


def test_softhsm_init_text_prints_export(tmp_path, softhsm_env):
    store = tmp_path / "my store"

    completed = _cli("softhsm", "init", "--dir", str(store), "--label", "edge-01",
                     env=softhsm_env)

    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert f"export SOFTHSM2_CONF='{store / 'softhsm2.conf'}'" in lines
    assert f"user PIN file: {store / 'edge-01.user-pin'}" in lines


def _verify(public_pem: str, signature: bytes, key: object) -> None:
    public = serialization.load_pem_public_key(public_pem.encode())
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, MESSAGE)
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH)
        public.verify(signature, MESSAGE, pss, hashes.SHA256())


def _sign(key: object) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(MESSAGE)
    assert isinstance(key, rsa.RSAPrivateKey)
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH)
    return key.sign(MESSAGE, pss, hashes.SHA256())


@pytest.mark.parametrize(
    ("algorithm", "reported"),
    [
        ("ec-p256", "ec-p256"),
        ("ec-p384", "ec-p384"),
        ("ed25519", "ed25519"),
        ("rsa-pss-2048", "rsa-2048"),
    ],
)
def test_generate_with_cli_then_sign(softhsm_token, softhsm_env, algorithm, reported):
    label = unique_label(algorithm)
    uri = softhsm_token.key_uri(label=label)

    generated = _cli("keys", "generate", uri, "--algorithm", algorithm, "--json", env=softhsm_env)
    assert generated.returncode == 0, generated.stderr
    info = json.loads(_cli("keys", "info", uri, "--json", env=softhsm_env).stdout)

    assert json.loads(generated.stdout)["device_id"] == info["device_id"]
    assert set(info) == {
        "uri", "device_id", "algorithm", "backend", "hardware_backed", "never_extractable",
        "always_sensitive", "public_key_pem",
    }
    assert info["algorithm"] == reported
    assert info["backend"] == "softhsm"
    assert info["hardware_backed"] is False
    assert info["never_extractable"] is True
    assert info["always_sensitive"] is True

    # Sign in this process; verify with nothing but the PEM public key the CLI printed.
    key = backend.open_key(uri)
    assert key.device_id == info["device_id"]
    _verify(info["public_key_pem"], _sign(key), key)
    with pytest.raises(KeyExportError):
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        with pytest.raises(KeyExportError):
            key.private_numbers()


def test_generate_used_label_exits_nonzero(softhsm_token, softhsm_env):
    uri = softhsm_token.key_uri(label=unique_label())
    assert _cli("keys", "generate", uri, "--algorithm", "ec-p256", env=softhsm_env).returncode == 0

    second = _cli("keys", "generate", uri, "--algorithm", "ec-p256", env=softhsm_env)

    assert second.returncode == 1
    errors = [line for line in second.stderr.splitlines() if line.startswith("device-sdk:")]
    assert len(errors) == 1
    assert "already has an object with label" in errors[0]
    assert "Traceback" not in second.stderr


def test_info_missing_key_one_line_and_debug_traceback(softhsm_token, softhsm_env):
    uri = softhsm_token.key_uri(label="absent")

    plain = _cli("keys", "info", uri, env=softhsm_env)
    debug = _cli("--debug", "keys", "info", uri, env=softhsm_env)

    assert plain.returncode == 1
    assert plain.stderr.strip().splitlines() == [
        "device-sdk: error: no private key matches object=absent on token 'sdk-test'"
    ]
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr


def test_pin_value_on_command_line_rejected(softhsm_token, softhsm_env):
    uri = f"pkcs11:token={softhsm_token.label};object=k?pin-value=1234"

    completed = _cli("keys", "info", uri, env=softhsm_env)

    assert completed.returncode == 1
    assert "pin-value in a command-line URI exposes the PIN" in completed.stderr
    assert "1234" not in completed.stderr


def test_generate_without_mechanism_names_it(tmp_path, softhsm_env):
    store = tmp_path / "store"
    init = _cli("softhsm", "init", "--dir", str(store), "--label", "no-eddsa", "--json",
                env=softhsm_env)
    assert init.returncode == 0, init.stderr
    result = json.loads(init.stdout)
    conf = Path(result["conf"])
    conf.write_text(conf.read_text().replace(
        "slots.mechanisms = ALL", "slots.mechanisms = ALL,-CKM_EC_EDWARDS_KEY_PAIR_GEN"
    ))
    env = {**softhsm_env, "SOFTHSM2_CONF": str(conf)}
    uri = result["uri"].replace("?", ";object=k?", 1)

    completed = _cli("keys", "generate", uri, "--algorithm", "ed25519", env=env)

    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == [
        "device-sdk: error: C_GetMechanismList on token 'no-eddsa': the token lacks "
        "CKM_EC_EDWARDS_KEY_PAIR_GEN (0x1055), which ed25519 needs; choose another --algorithm"
    ]


def test_keys_generate_without_softhsm2_conf(tmp_path, softhsm_env):
    store = tmp_path / "store"
    init = _cli("softhsm", "init", "--dir", str(store), "--label", "edge-01", "--json",
                env=softhsm_env)
    assert init.returncode == 0, init.stderr
    uri = json.loads(init.stdout)["uri"].replace("?", ";object=device?", 1)
    env = {name: value for name, value in softhsm_env.items() if name != "SOFTHSM2_CONF"}

    completed = _cli("keys", "generate", uri, "--algorithm", "ec-p256", env=env)

    assert completed.returncode == 1
    (line,) = completed.stderr.strip().splitlines()
    assert line.startswith("device-sdk: error: ")
    assert "no token matches" in line
    assert "SOFTHSM2_CONF is not set, so SoftHSM read its default config " in line
    assert "export SOFTHSM2_CONF=<store>/softhsm2.conf" in line
    assert "`device-sdk softhsm init` printed" in line


def test_open_key_without_softhsm2_conf(tmp_path, softhsm_env):
    store = tmp_path / "store"
    init = _cli("softhsm", "init", "--dir", str(store), "--label", "edge-01", "--json",
                env=softhsm_env)
    assert init.returncode == 0, init.stderr
    uri = json.loads(init.stdout)["uri"].replace("?", ";object=device?", 1)
    env = {name: value for name, value in softhsm_env.items() if name != "SOFTHSM2_CONF"}
    script = (
        "import sys\n"
        "from device_sdk.errors import TokenNotPresentError\n"
        "from device_sdk.keys import open_key\n"
        "try:\n"
        "    open_key(sys.argv[1])\n"
        "except TokenNotPresentError as exc:\n"
        "    print(exc)\n"
    )

    completed = subprocess.run(
        [sys.executable, "-c", script, uri],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert "SOFTHSM2_CONF is not set" in completed.stdout
    assert "export SOFTHSM2_CONF=<store>/softhsm2.conf" in completed.stdout
