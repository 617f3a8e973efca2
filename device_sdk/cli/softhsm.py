"""``device-sdk softhsm``: create a SoftHSM token store and token for development and CI."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from device_sdk.keys import softhsm


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "softhsm", help="SoftHSM software token for development and CI (not hardware-backed)"
    )
    commands = parser.add_subparsers(dest="softhsm_command", metavar="COMMAND")
    commands.required = True

    init = commands.add_parser(
        "init",
        help="create a token store in a directory and initialise a token with random PINs",
        description=(
            "Create DIR (mode 0700, with missing parents), DIR/softhsm2.conf and DIR/tokens/, "
            "initialise a token labelled LABEL, and write its user and SO PINs to "
            "DIR/LABEL.user-pin and DIR/LABEL.so-pin (mode 0600). Prints the "
            "`export SOFTHSM2_CONF=...` line that later commands need."
        ),
    )
    init.add_argument("--dir", required=True, type=Path, help="token store directory")
    init.add_argument("--label", required=True, help="token label, 1 to 32 ASCII characters")
    init.add_argument(
        "--module", help="path of libsofthsm2.so (default: found in the usual install paths)"
    )
    init.add_argument("--json", action="store_true", help="print one JSON object")
    init.set_defaults(handler=run_init)


def run_init(args: argparse.Namespace) -> int:
    store = softhsm.create_store(args.dir)
    token = softhsm.init_token(store, args.label, module_path=args.module)
    result = token.as_dict()
    # SoftHSM finds this store only through SOFTHSM2_CONF, so every later command needs it.
    result["softhsm2_conf"] = str(store.conf_path)
    result["export"] = export_line(store.conf_path)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"token {token.label!r} (serial {token.serial}) initialised in {store.directory}")
    print(f"user PIN file: {token.user_pin_file}")
    print(f"SO PIN file:   {token.so_pin_file}")
    print(f"token URI:     {result['uri']}")
    print("before using the token, set SOFTHSM2_CONF in each shell that uses it:")
    print(result["export"])
    print("SoftHSM keys are files on this host, not hardware-protected: development and CI only")
    return 0


def export_line(conf_path: Path) -> str:
    """Return the shell line that points SoftHSM at ``conf_path``, quoted for sh."""
    return f"export SOFTHSM2_CONF={shlex.quote(str(conf_path))}"
