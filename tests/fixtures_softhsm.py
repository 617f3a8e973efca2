"""SoftHSM fixtures: one token store per test process, one token, fresh keys per test.

SoftHSM reads SOFTHSM2_CONF in C_Initialize and python-pkcs11 keeps one initialised library per
path and process, so every test in a process shares one token store. The session fixture points
SOFTHSM2_CONF at it before any key is opened (and initialises the library again if a test loaded
it earlier). Tests stay isolated by using their own key labels, or their own token from
``softhsm_new_token``. Tests that need another store or config run in a subprocess with
``softhsm_env``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from device_sdk.errors import SoftHSMError
from device_sdk.keys import softhsm

INSTALL_REASON = "SoftHSM 2 is not installed; install it with: apt install softhsm2"


def _library_or_skip() -> str:
    try:
        return softhsm.find_library()
    except SoftHSMError:
        pytest.skip(INSTALL_REASON)


@pytest.fixture(scope="session")
def softhsm_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[softhsm.TokenStore]:
    """The process's SoftHSM token store, with SOFTHSM2_CONF pointing at it for the session."""
    library = _library_or_skip()
    store = softhsm.create_store(tmp_path_factory.mktemp("softhsm") / "store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(store.conf_path))
        patch.delenv("SOFTHSM_CONF", raising=False)
        from device_sdk.keys.pkcs11_session import reinitialize_module

        reinitialize_module(library, only_if_loaded=True)
        yield store


@pytest.fixture(scope="session")
def softhsm_token(softhsm_store: softhsm.TokenStore) -> softhsm.SoftHSMToken:
    """An initialised token shared by the session; its user PIN is in a mode 0600 file."""
    return softhsm.init_token(softhsm_store, "sdk-test")


@pytest.fixture
def softhsm_new_token(
    softhsm_store: softhsm.TokenStore,
) -> Callable[[], softhsm.SoftHSMToken]:
    """Return a factory of fresh tokens in the session store (about 60 ms each).

    Creating a token initialises the library again, so other open keys log in again on next use.
    """

    def make() -> softhsm.SoftHSMToken:
        return softhsm.init_token(softhsm_store, f"t-{uuid.uuid4().hex[:12]}")

    return make


@pytest.fixture
def softhsm_env(softhsm_store: softhsm.TokenStore) -> dict[str, str]:
    """Environment for a subprocess that uses the session's token store."""
    env = dict(os.environ)
    env.update(softhsm_store.environment())
    env.pop("SOFTHSM_CONF", None)
    return env


def unique_label(prefix: str = "key") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def softhsm_key_uri(softhsm_token: softhsm.SoftHSMToken) -> str:
    """URI of a fresh P-256 key on the session token, with pin-source=file:..., label unique."""
    from device_sdk.keys.pkcs11 import generate_key

    label = unique_label("p256")
    generate_key(softhsm_token.key_uri(label=label), "ec-p256")
    return softhsm_token.key_uri(label=label)
