"""``device-sdk keys``: generate a key on a token and show a key's identity and protection."""

from __future__ import annotations

import argparse
import json

from device_sdk.errors import ConfigError
from device_sdk.keys.uri import Pkcs11URI

URI_HELP = (
    "pkcs11: URI of the key, for example "
    "'pkcs11:token=edge;object=device?pin-source=file:/etc/device-sdk/pin'"
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from device_sdk.keys.pkcs11 import ALGORITHMS

    parser = subparsers.add_parser("keys", help="generate and inspect hardware keys")
    commands = parser.add_subparsers(dest="keys_command", metavar="COMMAND")
    commands.required = True

    generate = commands.add_parser(
        "generate",
        help="generate a non-extractable key pair on the token",
        description=(
            "Generate a key pair on the token named by URI, labelled with the URI's object= and "
            "with its id= (random 16 bytes if absent). A used label or id is rejected."
        ),
    )
    generate.add_argument("uri", help=URI_HELP)
    generate.add_argument(
        "--algorithm", required=True, choices=sorted(ALGORITHMS), help="key algorithm"
    )
    generate.add_argument("--json", action="store_true", help="print the key info as JSON")
    generate.set_defaults(handler=run_generate)

    info = commands.add_parser("info", help="show a key's device id, algorithm and protection")
    info.add_argument("uri", help=URI_HELP)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=run_info)


def _checked_uri(text: str) -> Pkcs11URI:
    # A PIN in a command-line argument is visible to every user through ps and /proc.
    uri = Pkcs11URI.parse(text)
    if uri.pin_value is not None:
        raise ConfigError(
            "pin-value in a command-line URI exposes the PIN to other users; write the PIN to a "
            "file of mode 0600 and use pin-source=file:/path/to/pin"
        )
    return uri


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
    from device_sdk.keys.pkcs11 import generate_key

    key = generate_key(_checked_uri(args.uri), args.algorithm)
    _print_info(key_info(key), args.json)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from device_sdk.keys.info import key_info
    from device_sdk.keys.pkcs11 import open_key

    key = open_key(_checked_uri(args.uri))
    _print_info(key_info(key), args.json)
    return 0
