"""``device-sdk keys``: generate a key on a token or a TPM, and show its identity and protection."""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

from device_sdk.errors import ConfigError
from device_sdk.keys.uri import Pkcs11URI, parse_key_uri

URI_HELP = (
    "key URI: pkcs11: (for example "
    "'pkcs11:token=edge;object=device?pin-source=file:/etc/device-sdk/pin') or tpm2: (for "
    "example 'tpm2:path=/var/lib/device-sdk/device-key.tss2.pem' or 'tpm2:handle=0x81000010')"
)

# The TPM's key algorithms are listed here so that building the parser does not import
# tpm2-pytss. Each backend's generate_key checks the name again.
TPM_ALGORITHMS = ("ec-p256", "ec-p384", "rsa-pss-2048")
_BACKENDS = {"pkcs11": "device_sdk.keys.pkcs11", "tpm2": "device_sdk.keys.tpm"}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from device_sdk.keys.pkcs11 import ALGORITHMS

    parser = subparsers.add_parser("keys", help="generate and inspect hardware keys")
    commands = parser.add_subparsers(dest="keys_command", metavar="COMMAND")
    commands.required = True

    generate = commands.add_parser(
        "generate",
        help="generate a non-extractable key pair on the token or TPM",
        description=(
            "Generate a key pair where URI points. pkcs11: the key is labelled with the URI's "
            "object= and gets its id= (random 16 bytes if absent); a used label or id is "
            "rejected. tpm2: the key is persisted at handle= or saved as a TSS2 PEM blob at "
            "path=; a used handle or an existing file is rejected."
        ),
    )
    generate.add_argument("uri", help=URI_HELP)
    generate.add_argument(
        "--algorithm",
        required=True,
        choices=sorted(set(ALGORITHMS) | set(TPM_ALGORITHMS)),
        help=f"key algorithm; a TPM makes only {', '.join(TPM_ALGORITHMS)}",
    )
    generate.add_argument("--json", action="store_true", help="print the key info as JSON")
    generate.set_defaults(handler=run_generate)

    info = commands.add_parser("info", help="show a key's device id, algorithm and protection")
    info.add_argument("uri", help=URI_HELP)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=run_info)


def _checked_uri(text: str) -> Any:
    """Parse a pkcs11: or tpm2: URI; reject a PIN in it, which ps and /proc show to every user."""
    uri = parse_key_uri(text)
    if isinstance(uri, Pkcs11URI) and uri.pin_value is not None:
        raise ConfigError(
            "pin-value in a command-line URI exposes the PIN to other users; write the PIN to a "
            "file of mode 0600 and use pin-source=file:/path/to/pin"
        )
    return uri


def _backend(text: str) -> Any:
    """Import the backend module for the URI's scheme; serial: keys are made by their firmware."""
    scheme = text.partition(":")[0].lower()
    name = _BACKENDS.get(scheme)
    if name is None:
        raise ConfigError(
            f"`device-sdk keys` takes pkcs11: and tpm2: URIs, not {scheme}:; a serial: secure "
            "element makes its key in its firmware"
        )
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"the {scheme}: key backend is not available here: {exc}") from exc


def _print_info(info: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for name, value in info.items():
        if name != "public_key_pem":
            print(f"{name}: {value}")
    print(str(info["public_key_pem"]).rstrip())


def run_generate(args: argparse.Namespace) -> int:
    from device_sdk.keys.info import key_info

    uri = _checked_uri(args.uri)
    key = _backend(args.uri).generate_key(uri, args.algorithm)
    _print_info(key_info(key), args.json)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from device_sdk.keys.info import key_info

    uri = _checked_uri(args.uri)
    key = _backend(args.uri).open_key(uri)
    _print_info(key_info(key), args.json)
    return 0
