"""Entry point of the ``device-sdk`` command.

Each command group lives in its own module under ``device_sdk.cli`` and exposes
``register(subparsers)``; the library never prints or exits, this module does. A
``DeviceSDKError`` becomes one readable line on stderr and exit status 1, and so does an
``OSError`` that escapes a command; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from device_sdk.errors import DeviceSDKError

# Command group modules, each with a register(subparsers) function. A module that is missing
# (its extra is not installed) is left out of the command list instead of breaking the CLI.
COMMAND_MODULES = (
    "device_sdk.cli.softhsm",
    "device_sdk.cli.keys",
    "device_sdk.cli.verifier",
    "device_sdk.cli.provision",
    "device_sdk.cli.login",
    "device_sdk.cli.info",
    "device_sdk.cli.demo",
    "device_sdk.cli.hil_agent",
)

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="device-sdk",
        description="Hardware-held device identity: keys, provisioning, login and the verifier.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        status = args.handler(args)
    except DeviceSDKError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"device-sdk: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as exc:
        if args.debug:
            traceback.print_exc()
        print(
            f"device-sdk: error: missing Python package {exc.name!r}; "
            "install the extra that provides it, for example: pip install 'device-sdk[all]'",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("device-sdk: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        # Last resort for a file or socket error the library did not turn into a DeviceSDKError.
        if args.debug:
            traceback.print_exc()
        print(f"device-sdk: error: {describe_os_error(command_name(args), exc)}", file=sys.stderr)
        return EXIT_ERROR
    return int(status or 0)


def command_name(args: argparse.Namespace) -> str:
    """Return the command that ran, with its subcommand: ``provision``, ``softhsm init``."""
    words = [args.command]
    subcommand = getattr(args, f"{args.command}_command", None)
    if isinstance(subcommand, str):
        words.append(subcommand)
    return " ".join(words)


def describe_os_error(operation: str, exc: OSError) -> str:
    """Format an OSError as ``<operation>: <strerror>: <path>`` (the path only when known)."""
    parts = [operation, exc.strerror or str(exc)]
    if exc.filename is not None:
        path = os.fsdecode(exc.filename) if isinstance(exc.filename, bytes) else str(exc.filename)
        if exc.filename2 is not None:
            path += f" -> {os.fsdecode(exc.filename2)}"
        parts.append(path)
    return ": ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
