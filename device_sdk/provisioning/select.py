"""Choosing a key store for ``device-sdk provision --auto``.

Order, first match wins:

1. the key URI in the existing device config (a re-run keeps its key);
2. ``DEVICE_SDK_KEY_URI``, a key URI configured for this device (for example by the OS image);
3. a TPM, when the TPM backend module is installed and a TPM device or TCTI is present;
4. SoftHSM, only when software keys are allowed: a token labelled ``device-sdk`` in the store
   that ``SOFTHSM2_CONF`` names, or in a new store next to the config.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from device_sdk.config import export_softhsm2_conf, load_config
from device_sdk.errors import ConfigError

logger = logging.getLogger(__name__)

KEY_URI_ENV = "DEVICE_SDK_KEY_URI"
TPM_DEVICES = ("/dev/tpmrm0", "/dev/tpm0")
TPM_TCTI_ENVS = ("TPM2TOOLS_TCTI", "TSS2_TCTI", "TCTI")
SOFTHSM_TOKEN_LABEL = "device-sdk"  # noqa: S105 (a token label, not a secret)
KEY_LABEL = "device-key"


@dataclass(frozen=True)
class KeyChoice:
    """The key URI ``--auto`` chose and why; ``environment`` must be set to use the key later."""

    uri: str
    source: str
    environment: dict[str, str]


def _from_config(config_path: Path) -> KeyChoice | None:
    if not config_path.exists():
        return None
    config = load_config(config_path)
    environment = {}
    if export_softhsm2_conf(config):
        environment["SOFTHSM2_CONF"] = str(config.softhsm2_conf)
    return KeyChoice(config.key_uri, f"the existing config {config_path}", environment)


def _from_tpm() -> KeyChoice | None:
    # device_sdk.keys.tpm is always importable as a file, but it raises on import without
    # tpm2-pytss (the optional "tpm" extra), so look for tpm2-pytss itself.
    if importlib.util.find_spec("tpm2_pytss") is None:
        logger.info("tpm2-pytss is not installed, so --auto does not look for a TPM")
        return None
    present = any(os.path.exists(path) for path in TPM_DEVICES) or any(
        os.environ.get(name) for name in TPM_TCTI_ENVS
    )
    if not present:
        return None
    from device_sdk.keys import tpm  # type: ignore[attr-defined]

    default_uri = getattr(tpm, "default_key_uri", None)
    if default_uri is None:
        logger.info("a TPM is present, but the TPM backend names no default key; skipping it")
        return None
    return KeyChoice(str(default_uri()), "the TPM", {})


def _from_softhsm(config_path: Path) -> KeyChoice:
    from device_sdk.keys import softhsm

    conf = os.environ.get("SOFTHSM2_CONF")
    if conf:
        store_dir = Path(conf).parent
    else:
        store_dir = config_path.absolute().parent / "softhsm"
    store = softhsm.create_store(store_dir)
    environment = store.environment()
    os.environ.update(environment)

    pin_file = store.directory / f"{SOFTHSM_TOKEN_LABEL}.user-pin"
    if pin_file.exists():
        uri = softhsm.key_uri(
            token=SOFTHSM_TOKEN_LABEL,
            object_label=KEY_LABEL,
            module_path=softhsm.find_library(),
            pin_file=pin_file,
        )
    else:
        token = softhsm.init_token(store, SOFTHSM_TOKEN_LABEL)
        uri = token.key_uri(label=KEY_LABEL)
    return KeyChoice(uri, f"SoftHSM token store {store.directory}", environment)


def choose_key(config_path: Path, *, allow_software_key: bool) -> KeyChoice:
    """Pick the key URI for ``--auto`` (see the module docstring for the order)."""
    choice = _from_config(config_path)
    if choice is None and os.environ.get(KEY_URI_ENV):
        choice = KeyChoice(os.environ[KEY_URI_ENV], f"${KEY_URI_ENV}", {})
    if choice is None:
        choice = _from_tpm()
    if choice is None and allow_software_key:
        choice = _from_softhsm(config_path)
    if choice is None:
        raise ConfigError(
            f"--auto found no key store: no config at {config_path}, {KEY_URI_ENV} is not set, "
            "and no TPM is usable. Pass --key URI, set "
            f"{KEY_URI_ENV}, or add --allow-software-key to use SoftHSM for development"
        )
    logger.info("--auto chose %s from %s", choice.uri, choice.source)
    return choice
