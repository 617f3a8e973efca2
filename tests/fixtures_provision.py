"""A provisioning lab for tests: a SoftHSM store, a running verifier, and `device-sdk` runs.

``provision_lab`` (function scope) gives a :class:`ProvisionLab` with:

- a SoftHSM token store in the test's temporary directory (``lab.new_token(label)``);
- the verifier ASGI app served by uvicorn on a free loopback port, with a SQLite registry that
  the test process opens too, to create enrollment tokens and list devices;
- ``lab.run("provision", ...)``: the real ``device-sdk`` command in a subprocess, with the
  store's ``SOFTHSM2_CONF`` and a private lock directory;
- ``lab.count_objects(token)``: private keys and certificates on a token, read in a subprocess so
  that the test process never loads SoftHSM with another store's config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from device_sdk.keys import softhsm

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
DB_ENV = "DEVICE_SDK_TEST_VERIFIER_DB"
ISSUER_ENV = "DEVICE_SDK_TEST_VERIFIER_ISSUER"


def create_verifier_app():  # type: ignore[no-untyped-def]
    """Build the verifier app from the environment: uvicorn's ``--factory`` target.

    Rate limits are off because crash tests log the same device in many times in a row.
    """
    from device_sdk.verifier import (
        SQLiteChallengeStore,
        SQLiteDeviceRegistry,
        Verifier,
        VerifierConfig,
    )
    from device_sdk.verifier.app import create_app

    database = Path(os.environ[DB_ENV])
    config = VerifierConfig(
        issuer=os.environ[ISSUER_ENV],
        challenge_limit_per_device=None,
        challenge_limit_per_address=None,
        failure_limit_per_device=None,
    )
    verifier = Verifier(
        config,
        registry=SQLiteDeviceRegistry(database),
        challenges=SQLiteChallengeStore(database.with_name("challenges.sqlite")),
    )
    return create_app(verifier)


COUNT_OBJECTS = textwrap.dedent(
    """
    import json, sys
    import pkcs11
    from pkcs11 import ObjectClass, Attribute
    module, label, pin_file = sys.argv[1:4]
    lib = pkcs11.lib(module)
    token = lib.get_token(token_label=label)
    pin = open(pin_file).read().strip()
    with token.open(user_pin=pin) as session:
        keys = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        certs = list(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE}))
        print(json.dumps({"private_keys": len(keys), "certificates": len(certs)}))
    """
)


@dataclass
class ProvisionLab:
    """Everything a provisioning test needs; see the module docstring."""

    directory: Path
    store: softhsm.TokenStore
    verifier_url: str
    database: Path
    env: dict[str, str]
    tokens: dict[str, softhsm.SoftHSMToken] = field(default_factory=dict)
    _token_count: int = 0

    def new_token(self, label: str) -> softhsm.SoftHSMToken:
        token = softhsm.init_token(self.store, label)
        self.tokens[label] = token
        return token

    def key_uri(self, token: softhsm.SoftHSMToken, label: str = "device-key") -> str:
        return token.key_uri(label=label)

    def _verifier(self):  # type: ignore[no-untyped-def]
        from device_sdk.verifier import (
            MemoryChallengeStore,
            SQLiteDeviceRegistry,
            Verifier,
            VerifierConfig,
        )

        return Verifier(
            VerifierConfig(issuer=self.verifier_url),
            registry=SQLiteDeviceRegistry(self.database),
            challenges=MemoryChallengeStore(),
        )

    def enrollment_token_file(self, name: str | None = None) -> Path:
        """Create a one-time enrollment token and write it to a file of mode 0600."""
        self._token_count += 1
        path = self.directory / f"{name or f'enroll-{self._token_count}'}.token"
        verifier = self._verifier()
        try:
            (token,) = verifier.create_enrollment_tokens(1)
        finally:
            verifier.registry.close()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        return path

    def devices(self) -> list[dict[str, object]]:
        verifier = self._verifier()
        try:
            return [record.to_json() for record in verifier.list_devices()]
        finally:
            verifier.registry.close()

    def run(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -m device_sdk ARGS`` with the lab environment."""
        return subprocess.run(
            [sys.executable, "-m", "device_sdk", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.directory,
            check=False,
        )

    def provision_args(
        self,
        key_uri: str,
        config: Path,
        token_file: Path,
        *extra: str,
    ) -> list[str]:
        return [
            "provision",
            "--key",
            key_uri,
            "--verifier",
            self.verifier_url,
            "--enrollment-token-file",
            str(token_file),
            "--config",
            str(config),
            "--allow-software-key",
            *extra,
        ]

    def count_objects(self, token: softhsm.SoftHSMToken) -> dict[str, int]:
        completed = subprocess.run(
            [
                sys.executable,
                "-c",
                COUNT_OBJECTS,
                token.module_path,
                token.label,
                str(token.user_pin_file),
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        counts: dict[str, int] = json.loads(completed.stdout)
        return counts

    def login(self, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.run("login", "--config", str(config), "--http", *extra)


def lab_environment(store: softhsm.TokenStore, directory: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(store.environment())
    env["DEVICE_SDK_LOCK_DIR"] = str(directory / "locks")
    env.pop(DB_ENV, None)
    python_path = [str(REPO_ROOT), str(REPO_ROOT / "tests")]
    if env.get("PYTHONPATH"):
        python_path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(python_path)
    return env


@pytest.fixture
def provision_lab(tmp_path: Path, uvicorn_factory: object) -> Iterator[ProvisionLab]:
    from fixtures_services import free_port

    try:
        softhsm.find_library()
    except softhsm.SoftHSMError:
        pytest.skip("SoftHSM not found; install it with: sudo apt-get install -y softhsm2")

    store = softhsm.create_store(tmp_path / "softhsm")
    database = tmp_path / "registry.sqlite"
    port = free_port()
    verifier_url = f"http://{HOST}:{port}"
    uvicorn_factory.app(  # type: ignore[attr-defined]
        "fixtures_provision:create_verifier_app",
        port=port,
        env={DB_ENV: str(database), ISSUER_ENV: verifier_url},
    )
    yield ProvisionLab(
        directory=tmp_path,
        store=store,
        verifier_url=verifier_url,
        database=database,
        env=lab_environment(store, tmp_path),
    )


__all__: Sequence[str] = ("ProvisionLab", "create_verifier_app", "provision_lab")
