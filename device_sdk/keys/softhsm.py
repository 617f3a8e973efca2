"""SoftHSM 2: the software PKCS#11 token used as the fallback for development and CI.

Keys in SoftHSM live in files on the host, so they report ``hardware_backed = False`` and opening
one logs a warning. This module finds the library and creates a token store: a directory with its
own ``softhsm2.conf``. It initialises tokens there with random PINs kept in files of mode 0600.
It checks a configuration before SoftHSM reads it, because SoftHSM 2.6.1 answers a missing config
file or token directory with a bare CKR_GENERAL_ERROR from C_Initialize.

SoftHSM reads ``SOFTHSM2_CONF`` in C_Initialize, once per initialisation, and python-pkcs11 keeps
one initialised library per path and process. So one process works with one token store at a
time: set ``SOFTHSM2_CONF`` before the first key is opened. A token created by another process
after that becomes visible only after the library is initialised again
(:func:`device_sdk.keys.pkcs11.reinitialize_module`); :func:`init_token` does that when the new
token is in the store this process uses.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from device_sdk.errors import SoftHSMError
from device_sdk.keys.uri import Pkcs11URI

__all__ = [
    "LIBRARY_ENV",
    "SoftHSMToken",
    "TokenStore",
    "check_config",
    "check_environment",
    "create_store",
    "find_library",
    "init_token",
    "is_softhsm",
    "key_uri",
]

log = logging.getLogger(__name__)

LIBRARY_ENV = "DEVICE_SDK_SOFTHSM_LIBRARY"
DEFAULT_CONF = Path("/etc/softhsm/softhsm2.conf")
CONF_NAME = "softhsm2.conf"
TOKENS_DIR_NAME = "tokens"

# Install paths of libsofthsm2.so, most common first.
LIBRARY_CANDIDATES = (
    # Debian, Ubuntu, Raspberry Pi OS: an alternatives link, then the multiarch paths.
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/arm-linux-gnueabihf/softhsm/libsofthsm2.so",
    # Fedora, RHEL.
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    # Homebrew on Apple silicon, on Intel macOS (also source builds), and on Linux.
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/home/linuxbrew/.linuxbrew/lib/softhsm/libsofthsm2.so",
)

INSTALL_HINT = (
    "install SoftHSM 2 (Debian, Ubuntu, Raspberry Pi OS: apt install softhsm2; "
    "Fedora: dnf install softhsm; macOS: brew install softhsm) "
    f"or set {LIBRARY_ENV} to the path of libsofthsm2.so"
)


def find_library() -> str:
    """Return the path of libsofthsm2.so: ``$DEVICE_SDK_SOFTHSM_LIBRARY``, else the first found."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        if not Path(override).is_file():
            raise SoftHSMError(f"{LIBRARY_ENV}={override} does not name a file; {INSTALL_HINT}")
        return override
    for candidate in LIBRARY_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    raise SoftHSMError(
        f"libsofthsm2.so not found in {', '.join(LIBRARY_CANDIDATES)}; {INSTALL_HINT}"
    )


def is_softhsm(module_path: str) -> bool:
    """Tell whether a PKCS#11 module path is SoftHSM, judged by its file name."""
    return "softhsm" in Path(module_path).name.lower()


@dataclass(frozen=True)
class TokenStore:
    """A SoftHSM token directory with its own config file."""

    directory: Path
    conf_path: Path
    tokens_dir: Path

    def environment(self) -> dict[str, str]:
        """Return the environment variables that point SoftHSM at this store."""
        return {"SOFTHSM2_CONF": str(self.conf_path)}


@dataclass(frozen=True)
class SoftHSMToken:
    """An initialised token: where it lives and the files holding its PINs (mode 0600)."""

    store: TokenStore
    module_path: str
    label: str
    serial: str
    user_pin_file: Path
    so_pin_file: Path

    def key_uri(self, label: str | None = None, key_id: bytes | None = None) -> str:
        """Return a pkcs11: URI for a key on this token, with its user PIN file as pin-source."""
        return key_uri(
            token=self.label,
            serial=self.serial,
            object_label=label,
            key_id=key_id,
            module_path=self.module_path,
            pin_file=self.user_pin_file,
        )

    def as_dict(self) -> dict[str, str]:
        return {
            "directory": str(self.store.directory),
            "conf": str(self.store.conf_path),
            "tokens_dir": str(self.store.tokens_dir),
            "module": self.module_path,
            "label": self.label,
            "serial": self.serial,
            "user_pin_file": str(self.user_pin_file),
            "so_pin_file": str(self.so_pin_file),
            "uri": self.key_uri(),
        }


def key_uri(
    *,
    token: str | None = None,
    serial: str | None = None,
    object_label: str | None = None,
    key_id: bytes | None = None,
    module_path: str | None = None,
    pin_file: Path | str | None = None,
    key_type: str | None = "private",
) -> str:
    """Build an RFC 7512 ``pkcs11:`` URI for a token, naming a key when a label or id is given."""
    names_key = object_label is not None or key_id is not None
    uri = Pkcs11URI(
        token=token,
        serial=serial,
        object=object_label,
        id=key_id,
        type=key_type if names_key else None,
        module_path=module_path,
        pin_source=f"file:{pin_file}" if pin_file is not None else None,
    )
    return str(uri)


def check_environment() -> Path:
    """Check the SoftHSM environment variables and config file; return the config path.

    Raises SoftHSMError when only the SoftHSM 1 variable SOFTHSM_CONF is set, when the config file
    is missing, or when the token directory it names is missing.
    """
    conf = os.environ.get("SOFTHSM2_CONF")
    legacy = os.environ.get("SOFTHSM_CONF")
    if not conf and legacy:
        raise SoftHSMError(
            f"SOFTHSM_CONF={legacy} is set, but that variable is for SoftHSM 1 and SoftHSM 2 "
            f"ignores it; export SOFTHSM2_CONF={legacy} instead"
        )
    path = Path(conf) if conf else DEFAULT_CONF
    check_config(path)
    return path


def check_config(conf_path: Path, *, writable: bool = False) -> Path:
    """Check a softhsm2.conf and its token directory; return the token directory.

    With ``writable=True`` the token directory must also be writable, as creating tokens and
    keys needs.
    """
    source = "SOFTHSM2_CONF" if os.environ.get("SOFTHSM2_CONF") == str(conf_path) else "config"
    if not conf_path.is_file():
        raise SoftHSMError(
            f"SoftHSM config file {conf_path} ({source}) not found; create a token store with "
            "`device-sdk softhsm init --dir DIR --label LABEL` and export the SOFTHSM2_CONF it "
            "prints"
        )
    try:
        text = conf_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SoftHSMError(
            f"SoftHSM config file {conf_path} is not readable ({exc.strerror}); "
            "fix its permissions"
        ) from exc

    match = re.search(r"^\s*directories\.tokendir\s*=\s*(.+?)\s*$", text, re.MULTILINE)
    if match is None:
        raise SoftHSMError(
            f"SoftHSM config file {conf_path} has no directories.tokendir line; "
            "add one naming the token directory"
        )
    tokens_dir = Path(match.group(1))
    check_token_dir(tokens_dir, writable=writable, conf_path=conf_path)
    return tokens_dir


def check_token_dir(tokens_dir: Path, *, writable: bool, conf_path: Path | None = None) -> None:
    """Check that a SoftHSM token directory exists and, if asked, that this user can write it."""
    named_in = f" (directories.tokendir in {conf_path})" if conf_path else ""
    try:
        exists = tokens_dir.exists()
    except OSError as exc:
        raise SoftHSMError(
            f"SoftHSM token directory {tokens_dir}{named_in} cannot be reached by uid "
            f"{os.getuid()} ({exc.strerror}); fix the permissions of its parent directories"
        ) from exc
    if not exists:
        raise SoftHSMError(
            f"SoftHSM token directory {tokens_dir}{named_in} does not exist; create it with "
            f"`mkdir -p {tokens_dir}` or run `device-sdk softhsm init --dir DIR --label LABEL`"
        )
    if not tokens_dir.is_dir():
        raise SoftHSMError(
            f"SoftHSM token directory {tokens_dir}{named_in} is not a directory; "
            "point directories.tokendir at a directory"
        )
    if writable and not os.access(tokens_dir, os.W_OK | os.X_OK):
        raise SoftHSMError(
            f"SoftHSM token directory {tokens_dir}{named_in} is not writable by uid "
            f"{os.getuid()}; fix it with `chmod u+rwx {tokens_dir}` (or chown it to this user), "
            "or choose another directory"
        )


def create_store(directory: Path | str) -> TokenStore:
    """Create (or reuse) a token store in ``directory``: ``softhsm2.conf`` plus ``tokens/``.

    The directory and any missing parents are created with mode 0700; the config file is
    rewritten only when absent.
    """
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise SoftHSMError(f"{directory} exists and is not a directory; choose another --dir")
    if not directory.exists():
        _make_private_directories(directory)
    check_token_dir(directory, writable=True)

    tokens_dir = directory / TOKENS_DIR_NAME
    tokens_dir.mkdir(mode=0o700, exist_ok=True)
    conf_path = directory / CONF_NAME
    if not conf_path.exists():
        conf_path.write_text(
            "# Written by device-sdk: a SoftHSM 2 token store for development and CI.\n"
            f"directories.tokendir = {tokens_dir}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
            "slots.mechanisms = ALL\n"
            "library.reset_on_fork = false\n",
            encoding="utf-8",
        )
    check_config(conf_path, writable=True)
    log.info("SoftHSM token store ready in %s", directory)
    return TokenStore(directory=directory, conf_path=conf_path, tokens_dir=tokens_dir)


def _make_private_directories(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each with mode 0700.

    ``Path.mkdir(parents=True)`` would give the parents the umask's mode, so each level is made
    here. The nearest existing ancestor must be a directory this user can write.
    """
    missing = [directory]
    existing = directory.parent
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise SoftHSMError(
            f"cannot create token store {directory}: {existing} is not a directory; "
            "choose another --dir"
        )
    check_token_dir(existing, writable=True)

    for level in reversed(missing):
        try:
            level.mkdir(mode=0o700)
        except FileExistsError:
            # Another process made it between the check and here; it must still be a directory.
            if not level.is_dir():
                raise SoftHSMError(
                    f"{level} exists and is not a directory; choose another --dir"
                ) from None
        except OSError as exc:
            raise SoftHSMError(
                f"cannot create token store directory {level}: {exc.strerror}; "
                "choose another --dir"
            ) from None
        else:
            # mkdir applies the umask to the mode; the store must not be readable by others.
            level.chmod(0o700)


def _write_secret(path: Path, value: str) -> None:
    """Write a secret to a new file created with mode 0600 (never readable by others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(value)


def _new_pin() -> str:
    # 128 bits from the OS CSPRNG, in characters that every token accepts in a PIN.
    return secrets.token_hex(16)


_LABEL_RE = re.compile(r"^[\x20-\x7e]{1,32}$")


def init_token(
    store: TokenStore,
    label: str,
    *,
    module_path: str | None = None,
) -> SoftHSMToken:
    """Initialise a new token labelled ``label`` in ``store`` with random SO and user PINs.

    The PINs go to ``<store>/<label>.user-pin`` and ``<store>/<label>.so-pin`` (mode 0600) and
    reach the token through a child process that reads those files, so no PIN is ever on a
    command line. Raises SoftHSMError when the label is in use or SoftHSM fails.
    """
    if not _LABEL_RE.match(label) or label != label.strip():
        raise SoftHSMError(
            f"token label {label!r} is invalid; use 1 to 32 printable ASCII characters without "
            "leading or trailing spaces"
        )
    module_path = module_path or find_library()
    check_config(store.conf_path, writable=True)

    file_stem = re.sub(r"[^A-Za-z0-9._-]", "_", label)
    user_pin_file = store.directory / f"{file_stem}.user-pin"
    so_pin_file = store.directory / f"{file_stem}.so-pin"
    for path in (user_pin_file, so_pin_file):
        if path.exists():
            raise SoftHSMError(
                f"PIN file {path} already exists, so token {label!r} was initialised before; "
                "choose another label or delete the token and its PIN files"
            )
    _write_secret(so_pin_file, _new_pin())
    _write_secret(user_pin_file, _new_pin())

    env = {**os.environ, **store.environment()}
    env.pop("SOFTHSM_CONF", None)
    command = [
        sys.executable, "-m", "device_sdk.keys._softhsm_init",
        module_path, label, str(so_pin_file), str(user_pin_file),
    ]
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    try:
        result = json.loads(completed.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"error": (completed.stderr or completed.stdout).strip()[-500:]}
    if completed.returncode != 0 or "serial" not in result:
        user_pin_file.unlink(missing_ok=True)
        so_pin_file.unlink(missing_ok=True)
        raise SoftHSMError(
            f"initialising SoftHSM token {label!r} in {store.directory} failed: "
            f"{result.get('error', 'no result')}"
        )

    token = SoftHSMToken(
        store=store,
        module_path=module_path,
        label=label,
        serial=str(result["serial"]),
        user_pin_file=user_pin_file,
        so_pin_file=so_pin_file,
    )
    log.info("initialised SoftHSM token %r (serial %s) in %s", label, token.serial, store.directory)
    _refresh_if_loaded(store, module_path)
    return token


def _refresh_if_loaded(store: TokenStore, module_path: str) -> None:
    """Make a token created by the child process visible to this process's loaded SoftHSM."""
    if os.environ.get("SOFTHSM2_CONF") != str(store.conf_path):
        return
    from device_sdk.keys.pkcs11_session import reinitialize_module

    reinitialize_module(module_path, only_if_loaded=True)
