"""SoftHSM token stores: library search, config checks, token initialisation and PIN files."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from device_sdk.errors import SoftHSMError
from device_sdk.keys import pkcs11 as backend
from device_sdk.keys import softhsm

NOBODY = 65534


def test_library_env_override(monkeypatch, softhsm_token):
    monkeypatch.setenv(softhsm.LIBRARY_ENV, softhsm_token.module_path)

    assert softhsm.find_library() == softhsm_token.module_path


def test_library_env_override_missing_file(monkeypatch, tmp_path):
    missing = tmp_path / "libsofthsm2.so"
    monkeypatch.setenv(softhsm.LIBRARY_ENV, str(missing))

    with pytest.raises(SoftHSMError, match=f"{softhsm.LIBRARY_ENV}={missing} does not name a file"):
        softhsm.find_library()


def test_library_not_installed_names_install_command(monkeypatch):
    monkeypatch.delenv(softhsm.LIBRARY_ENV, raising=False)
    monkeypatch.setattr(softhsm, "LIBRARY_CANDIDATES", ("/nonexistent/libsofthsm2.so",))

    with pytest.raises(SoftHSMError) as caught:
        softhsm.find_library()

    assert "libsofthsm2.so not found in /nonexistent/libsofthsm2.so" in str(caught.value)
    assert "apt install softhsm2" in str(caught.value)


def test_library_candidates_cover_platforms():
    candidates = "\n".join(softhsm.LIBRARY_CANDIDATES)

    for directory in (
        "/usr/lib/x86_64-linux-gnu/softhsm/",
        "/usr/lib/aarch64-linux-gnu/softhsm/",
        "/usr/lib/arm-linux-gnueabihf/softhsm/",
        "/usr/lib64/pkcs11/",
        "/opt/homebrew/lib/softhsm/",
    ):
        assert directory in candidates


def test_store_config_names_token_dir(tmp_path):
    store = softhsm.create_store(tmp_path / "store")

    text = store.conf_path.read_text()
    assert f"directories.tokendir = {store.tokens_dir}\n" in text
    assert "objectstore.backend = file\n" in text
    assert store.tokens_dir.is_dir()
    assert softhsm.check_config(store.conf_path, writable=True) == store.tokens_dir


def test_store_parent_missing_created(tmp_path):
    target = tmp_path / "absent" / "store"

    store = softhsm.create_store(target)

    assert store.directory == target
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert store.tokens_dir.is_dir()


def test_pin_files_private_and_random(softhsm_token):
    user = softhsm_token.user_pin_file
    so = softhsm_token.so_pin_file

    for path in (user, so):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(path.read_text()) == 32
    assert user.read_text() != so.read_text()


def test_duplicate_label_rejected(softhsm_store, softhsm_token):
    with pytest.raises(SoftHSMError, match="PIN file .*sdk-test.user-pin already exists"):
        softhsm.init_token(softhsm_store, softhsm_token.label)


def test_duplicate_label_rejected_by_token_scan(softhsm_store, softhsm_token, tmp_path):
    # Same store, same label, but PIN files elsewhere: the token scan in the child rejects it.
    other = softhsm.TokenStore(
        directory=tmp_path, conf_path=softhsm_store.conf_path, tokens_dir=softhsm_store.tokens_dir
    )

    with pytest.raises(SoftHSMError, match="a token labelled 'sdk-test' already exists"):
        softhsm.init_token(other, softhsm_token.label)

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("label", ["x" * 33, " edge", "", "caf\u00e9"])
def test_invalid_label_rejected(softhsm_store, label):
    with pytest.raises(SoftHSMError, match=f"token label {label!r} is invalid"):
        softhsm.init_token(softhsm_store, label)


def test_new_token_usable_in_this_process(softhsm_new_token):
    token = softhsm_new_token()

    key = backend.generate_key(token.key_uri(label="fresh"), "ec-p256")

    assert Path(token.user_pin_file).exists()
    assert key.signer.token_label() == token.label


def test_legacy_conf_variable_explained(monkeypatch, softhsm_store):
    monkeypatch.delenv("SOFTHSM2_CONF")
    monkeypatch.setenv("SOFTHSM_CONF", str(softhsm_store.conf_path))

    with pytest.raises(SoftHSMError) as caught:
        softhsm.check_environment()

    message = str(caught.value)
    assert "SOFTHSM_CONF" in message
    assert f"export SOFTHSM2_CONF={softhsm_store.conf_path} instead" in message


def test_missing_config_file(monkeypatch, tmp_path):
    conf = tmp_path / "softhsm2.conf"
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))

    with pytest.raises(SoftHSMError, match=f"config file {conf} \\(SOFTHSM2_CONF\\) not found"):
        softhsm.check_environment()


def test_config_without_tokendir(tmp_path):
    conf = tmp_path / "softhsm2.conf"
    conf.write_text("objectstore.backend = file\n")

    with pytest.raises(SoftHSMError, match="has no directories.tokendir line"):
        softhsm.check_config(conf)


def test_missing_token_dir(tmp_path):
    conf = tmp_path / "softhsm2.conf"
    tokens = tmp_path / "gone"
    conf.write_text(f"directories.tokendir = {tokens}\n")

    with pytest.raises(SoftHSMError) as caught:
        softhsm.check_config(conf)

    assert f"token directory {tokens} (directories.tokendir in {conf}) does not exist" in str(
        caught.value
    )
    assert f"mkdir -p {tokens}" in str(caught.value)


def test_read_only_token_dir(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir(mode=0o555)
    if os.geteuid() != 0:
        with pytest.raises(SoftHSMError, match=f"{tokens} is not writable by uid"):
            softhsm.check_token_dir(tokens, writable=True)
        return

    # root writes anywhere, so a forked child checks as the unprivileged user "nobody" (uid
    # 65534), in a directory that this user can reach: pytest's temporary directories are 0700.
    public = Path(tempfile.mkdtemp(prefix="softhsm-ro-"))
    try:
        public.chmod(0o755)
        tokens = public / "tokens"
        tokens.mkdir(mode=0o555)
        os.chown(tokens, NOBODY, NOBODY)
        message = _check_as_nobody(tokens)
    finally:
        shutil.rmtree(public)

    assert message.startswith(f"SoftHSM token directory {tokens} is not writable by uid 65534")
    assert f"chmod u+rwx {tokens}" in message


def _check_as_nobody(tokens: Path) -> str:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                softhsm.check_token_dir(tokens, writable=True)
                os.write(write_end, b"no error")
            except SoftHSMError as exc:
                os.write(write_end, str(exc).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


def test_changed_conf_after_load_explained(monkeypatch, softhsm_key_uri, tmp_path):
    backend.open_key(softhsm_key_uri)
    monkeypatch.setenv("SOFTHSM2_CONF", str(tmp_path / "other.conf"))

    with pytest.raises(SoftHSMError) as caught:
        backend.open_key(softhsm_key_uri)

    assert f"SOFTHSM2_CONF is now {tmp_path / 'other.conf'}" in str(caught.value)
    assert "reads the variable only then" in str(caught.value)
