"""TLS client authentication with a TPM key, through OpenSSL's tpm2 provider (tpm2-openssl).

Once OpenSSL has the tpm2 provider active, Python's ``ssl`` loads a TSS2 PEM key blob like any
key file, and the private key operations run in the TPM. Two facts shape the set-up:

- OpenSSL reads ``OPENSSL_CONF`` when the ``ssl`` module initialises, so the variable, and
  ``TPM2OPENSSL_TCTI``, must be in the environment before Python starts:
  :func:`openssl_environment` returns them for a service unit or a child process.
- The property query ``?provider=tpm2`` makes OpenSSL prefer the tpm2 provider's
  implementations, and ``tpm2.digest!=yes`` keeps hashing on the host, where it costs no TPM
  round trip per hash.

Only TLS 1.3 is offered, because a TLS 1.2 handshake with the TPM key fails (tested with
tpm2-openssl 1.1.1 and OpenSSL 3.0.19 on Debian 12). The tpm2 provider keeps the key loaded
while the context lives, so the TCTI should be a resource manager (``tabrmd:`` or
``device:/dev/tpmrm0``), not a bare swtpm socket or ``/dev/tpm0``.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from device_sdk.errors import ConfigError, KeyStoreError
from device_sdk.keys.uri import Tpm2URI

__all__ = [
    "OPENSSL_CONFIG",
    "client_context",
    "openssl_environment",
    "write_openssl_config",
]

OPENSSL_CONFIG = """\
# OpenSSL configuration for device-sdk: the tpm2 provider next to the default one.
openssl_conf = openssl_init

[openssl_init]
providers = provider_sect
alg_section = evp_properties

[provider_sect]
default = default_sect
tpm2 = tpm2_sect

[default_sect]
activate = 1

[tpm2_sect]
activate = 1

[evp_properties]
default_properties = ?provider=tpm2,tpm2.digest!=yes
"""


def write_openssl_config(path: str | Path) -> Path:
    """Write :data:`OPENSSL_CONFIG` to ``path`` (mode 0644) and return the path."""
    target = Path(path)
    target.write_text(OPENSSL_CONFIG)
    target.chmod(0o644)
    return target


def openssl_environment(config_path: str | Path, tcti: str) -> dict[str, str]:
    """Return the variables a process needs, set before it starts, to use TPM keys in TLS."""
    return {"OPENSSL_CONF": str(config_path), "TPM2OPENSSL_TCTI": tcti}


def client_context(
    certificate: str | Path, key: str | Tpm2URI, ca_file: str | Path
) -> ssl.SSLContext:
    """Build a TLS 1.3 client context that authenticates with a TPM key blob and its certificate.

    ``key`` is a ``tpm2:path=`` URI or the blob's path. Raises ConfigError when this process
    started without the OpenSSL set-up (see the module docstring) or with another TCTI than the
    key's, and KeyStoreError when OpenSSL cannot load the key.
    """
    if isinstance(key, str) and key.startswith("tpm2:"):
        key = Tpm2URI.parse(key)
    if isinstance(key, Tpm2URI):
        if key.path is None:
            raise ConfigError(
                f"{key} is a persistent handle; TLS through OpenSSL needs the key as a TSS2 PEM "
                "blob (tpm2:path=...)"
            )
        _check_tcti(key)
        key_path = key.path
    else:
        key_path = str(key)

    if not os.environ.get("OPENSSL_CONF"):
        raise ConfigError(
            "OPENSSL_CONF is not set, so OpenSSL has no tpm2 provider for the TPM key: write the "
            "configuration with write_openssl_config() and start this process with "
            "openssl_environment() in its environment"
        )

    context = ssl.create_default_context(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(str(certificate), key_path)
    except ssl.SSLError as exc:
        raise KeyStoreError(
            f"OpenSSL could not load the TPM key {key_path} with certificate {certificate} "
            f"({exc.reason or exc}); check that OPENSSL_CONF activates the tpm2 provider, that "
            "TPM2OPENSSL_TCTI reaches the TPM that made the key, and that the certificate is "
            "for this key"
        ) from exc
    return context


def _check_tcti(key: Tpm2URI) -> None:
    configured = os.environ.get("TPM2OPENSSL_TCTI")
    if key.tcti is not None and configured != key.tcti:
        raise ConfigError(
            f"the key's TCTI is {key.tcti!r} but TPM2OPENSSL_TCTI is {configured!r}; the tpm2 "
            "provider reads TPM2OPENSSL_TCTI at start-up, so start the process with the key's TCTI"
        )
