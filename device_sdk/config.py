"""The device config file: which key the device uses and where it logs in.

A flat TOML table written by provisioning and read by every client::

    device_id = "q0S3...43 characters of base64url..."
    key_uri = "pkcs11:token=edge-01;object=device;type=private"
    pin_source = "file:/etc/device-sdk/pin"
    backend = "pkcs11"
    hardware_backed = true
    algorithm = "ec-p256"
    verifier_url = "https://verifier.example.com"
    broker_url = "mqtts://broker.example.com:8883"
    ca_bundle = "/etc/device-sdk/ca.pem"
    certificate_path = "/etc/device-sdk/device.pem"
    software_key_allowed = false

An optional ``softhsm2_conf`` path is written for SoftHSM keys only. SoftHSM finds its token
store through the ``SOFTHSM2_CONF`` environment variable, and :func:`export_softhsm2_conf` sets
it from the file when the environment does not.

The file contains no secret: a ``key_uri`` with a ``pin-value`` is rejected, and the PIN comes from
``pin_source`` (see :func:`device_sdk.keys.uri.read_pin_source`). :func:`save_config` still writes
the file with mode 0600, because the file names the key and PIN file that the device uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import stat
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import tomli_w

from device_sdk.errors import ConfigError, URIError
from device_sdk.keys.uri import Pkcs11URI, parse_key_uri, parse_pin_source

__all__ = ["ALGORITHMS", "DeviceConfig", "export_softhsm2_conf", "load_config", "save_config"]

logger = logging.getLogger(__name__)

# Algorithm names as the CLI's --algorithm option spells them.
ALGORITHMS: Final = ("ec-p256", "ec-p384", "ed25519", "rsa-pss-2048", "rsa-pss-3072")

# A device_id is unpadded base64url of a SHA-256 digest: 32 bytes give 43 characters.
_DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}", re.ASCII)

CONFIG_MODE: Final = 0o600


@dataclass(frozen=True)
class DeviceConfig:
    """The contents of a device config file, validated on construction.

    ``pin_source`` is None for keys that need no PIN (a TPM key without an auth value).
    ``software_key_allowed`` records that provisioning was allowed to use a software key.
    ``softhsm2_conf`` is the SoftHSM config file of the token store that contains a SoftHSM key.
    """

    device_id: str
    key_uri: str
    backend: str
    hardware_backed: bool
    algorithm: str
    verifier_url: str
    pin_source: str | None = None
    broker_url: str | None = None
    ca_bundle: Path | None = None
    certificate_path: Path | None = None
    software_key_allowed: bool = False
    softhsm2_conf: Path | None = None

    def __post_init__(self) -> None:
        self._check_types()
        self._check_device_id()
        self._check_key_uri()
        self._check_urls()
        if self.softhsm2_conf is not None and not self.softhsm2_conf.is_absolute():
            raise ConfigError(
                f"softhsm2_conf {str(self.softhsm2_conf)!r} is a relative path; give the "
                "absolute path of the SoftHSM config file, such as "
                "/etc/device-sdk/softhsm/softhsm2.conf"
            )

        if not self.backend:
            raise ConfigError("backend is empty: name the key backend, such as 'pkcs11'")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(
                f"invalid algorithm {self.algorithm!r}: use one of {', '.join(ALGORITHMS)}"
            )

    def _check_types(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = _FIELD_TYPES[field.name]
            if value is None and field.name in _OPTIONAL_FIELDS:
                continue
            if expected is Path and isinstance(value, str):
                object.__setattr__(self, field.name, Path(value))
                continue
            # The value is not shown: a PIN put in the wrong field must not reach a log.
            if not _has_type(value, expected):
                raise ConfigError(
                    f"{field.name} must be {_TYPE_NAMES[expected]}, got {type(value).__name__}"
                )

    def _check_device_id(self) -> None:
        if not _DEVICE_ID_RE.fullmatch(self.device_id):
            raise ConfigError(
                f"invalid device_id {self.device_id!r}: it is 43 characters of unpadded "
                "base64url (the SHA-256 of the public key); run `device-sdk keys info URI` "
                "to get it"
            )

    def _check_key_uri(self) -> None:
        if self.pin_source is not None:
            try:
                parse_pin_source(self.pin_source)
            except ConfigError as exc:
                raise ConfigError(f"invalid pin_source: {exc}") from None

        # URIError messages never quote a pin-value, so the error can be passed on as it is.
        try:
            key_uri = parse_key_uri(self.key_uri)
        except URIError as exc:
            raise ConfigError(f"invalid key_uri: {exc}") from None
        if isinstance(key_uri, Pkcs11URI):
            self._check_pkcs11_pin_source(key_uri)

    def _check_pkcs11_pin_source(self, key_uri: Pkcs11URI) -> None:
        if key_uri.pin_value is not None:
            raise ConfigError(
                "key_uri contains a pin-value, and the config file must hold no PIN: remove "
                "it, write the PIN to a file of mode 0600 and set "
                'pin_source = "file:/path/to/pin"'
            )
        if key_uri.pin_source is not None:
            try:
                parse_pin_source(key_uri.pin_source)
            except ConfigError as exc:
                raise ConfigError(f"invalid pin-source in key_uri: {exc}") from None
        if (
            key_uri.pin_source is not None
            and self.pin_source is not None
            and key_uri.pin_source != self.pin_source
        ):
            raise ConfigError(
                f"key_uri has pin-source {key_uri.pin_source!r} but pin_source is "
                f"{self.pin_source!r}; keep one of them"
            )

    def _check_urls(self) -> None:
        _check_url("verifier_url", self.verifier_url, ("http", "https"))
        if self.broker_url is not None:
            _check_url("broker_url", self.broker_url, ("mqtt", "mqtts", "ws", "wss"))

    def to_toml(self) -> str:
        """Return the config as TOML text, leaving out optional fields that are None."""
        table: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            table[field.name] = str(value) if isinstance(value, Path) else value
        return tomli_w.dumps(table)


_FIELD_TYPES: Final[dict[str, type]] = {
    "device_id": str,
    "key_uri": str,
    "backend": str,
    "hardware_backed": bool,
    "algorithm": str,
    "verifier_url": str,
    "pin_source": str,
    "broker_url": str,
    "ca_bundle": Path,
    "certificate_path": Path,
    "software_key_allowed": bool,
    "softhsm2_conf": Path,
}
_OPTIONAL_FIELDS: Final = frozenset(
    {
        "pin_source",
        "broker_url",
        "ca_bundle",
        "certificate_path",
        "software_key_allowed",
        "softhsm2_conf",
    }
)
_REQUIRED_FIELDS: Final = tuple(name for name in _FIELD_TYPES if name not in _OPTIONAL_FIELDS)
_TYPE_NAMES: Final[dict[type, str]] = {
    str: "a string",
    bool: "a boolean (true or false)",
    Path: "a path string",
}


def _has_type(value: object, expected: type) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    return isinstance(value, expected)


def _check_url(field: str, url: str, schemes: tuple[str, ...]) -> None:
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:
        hostname = None
    if hostname is None or parts.scheme not in schemes:
        raise ConfigError(
            f"invalid {field} {url!r}: give a {' or '.join(schemes)} URL with a host, "
            f"such as {schemes[-1]}://server.example.com"
        )


def export_softhsm2_conf(config: DeviceConfig) -> bool:
    """Set ``SOFTHSM2_CONF`` from ``config.softhsm2_conf`` unless the environment sets it.

    Call it before the first SoftHSM key is opened, because SoftHSM reads the variable only when
    the module is initialised. Returns True when the variable was set here.
    """
    if config.softhsm2_conf is None or os.environ.get("SOFTHSM2_CONF"):
        return False
    os.environ["SOFTHSM2_CONF"] = str(config.softhsm2_conf)
    logger.info("set SOFTHSM2_CONF=%s from the device config", config.softhsm2_conf)
    return True


def load_config(path: str | os.PathLike[str]) -> DeviceConfig:
    """Read and validate the device config file at ``path``.

    Raises ConfigError naming the path and the field for a missing file, invalid TOML, a
    missing or unknown field, or a value of the wrong type.
    """
    config_path = Path(path)
    try:
        data = config_path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {config_path} not found; create it with `device-sdk provision`"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {config_path} cannot be read: {exc.strerror}") from None

    _warn_if_writable_by_others(config_path)

    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {config_path} is not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {config_path} is not valid TOML: {exc}") from None

    unknown = sorted(set(table) - set(_FIELD_TYPES))
    if unknown:
        raise ConfigError(
            f"config file {config_path}: unknown field(s) {', '.join(unknown)}; "
            f"known fields: {', '.join(_FIELD_TYPES)}"
        )
    missing = [name for name in _REQUIRED_FIELDS if name not in table]
    if missing:
        raise ConfigError(
            f"config file {config_path}: missing required field(s) {', '.join(missing)}"
        )
    for name, value in table.items():
        expected = _FIELD_TYPES[name]
        if not _has_type(value, str if expected is Path else expected):
            raise ConfigError(
                f"config file {config_path}: field {name} must be {_TYPE_NAMES[expected]}, "
                f"got {_toml_type_name(value)}"
            )

    try:
        return DeviceConfig(**table)
    except ConfigError as exc:
        raise ConfigError(f"config file {config_path}: {exc}") from None


def _toml_type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _warn_if_writable_by_others(path: Path) -> None:
    # A user who can rewrite the config can point the device at another verifier or key.
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o022:
            logger.warning(
                "config file %s has mode %04o, which lets group or others change it; "
                "run: chmod 600 %s",
                path,
                mode,
                path,
            )


def save_config(config: DeviceConfig, path: str | os.PathLike[str]) -> None:
    """Write ``config`` to ``path`` atomically, with mode 0600.

    The text goes to a temporary file in the same directory, created with mode 0600, and is
    flushed to disk before it is renamed over ``path``. The directory is synced afterwards, so
    the rename survives a power cut. A reader sees the old file or the new one, never a partial
    file, and a failed write leaves the old file as it was.
    """
    config_path = Path(path)
    directory = config_path.parent
    if not directory.is_dir():
        raise ConfigError(
            f"cannot write config file {config_path}: directory {directory} does not exist; "
            "create it first"
        )
    data = config.to_toml().encode("utf-8")

    try:
        # mkstemp creates the file with mode 0600 and O_EXCL, so it is never readable by others.
        fd, temp_name = tempfile.mkstemp(
            prefix=f".{config_path.name}.", suffix=".tmp", dir=directory
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot write config file {config_path}: {exc.strerror} in {directory}"
        ) from None

    try:
        with os.fdopen(fd, "wb") as temp_file:
            os.fchmod(temp_file.fileno(), CONFIG_MODE)
            temp_file.write(data)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_name, config_path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        if isinstance(exc, OSError):
            raise ConfigError(
                f"cannot write config file {config_path}: {exc.strerror or exc}; "
                "the previous file, if any, is unchanged"
            ) from exc
        raise

    _fsync_directory(directory)
    logger.info("wrote config file %s for device %s", config_path, config.device_id)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
