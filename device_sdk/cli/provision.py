"""``device-sdk provision``: turn a blank token into an enrolled device, one or a batch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from device_sdk.config import ALGORITHMS
from device_sdk.errors import ConfigError
from device_sdk.provisioning.batch import (
    STATUS_FAILED,
    ManifestRow,
    RowOutcome,
    RowResult,
    read_manifest,
    run_batch,
    write_report,
)
from device_sdk.provisioning.run import (
    DEFAULT_ALGORITHM,
    ProvisioningRequest,
    ProvisioningResult,
    StepOutcome,
    provision,
)
from device_sdk.provisioning.select import KEY_LABEL, choose_key

BAR_WIDTH = 30


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "provision",
        help="create or find the device key, enroll it and write the device config",
        description=(
            "Provision a device: open or create the key, check it is non-extractable, build a "
            "CSR signed by the key, enroll with the verifier using a one-time enrollment token, "
            "store the certificate, write the device config and log in once as a self-test. "
            "Each step is recorded next to the config, so a run that was interrupted resumes. "
            "With --batch, provision every row of a CSV manifest (see docs/provisioning.md)."
        ),
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--key", metavar="URI", help="key URI, e.g. pkcs11:token=T;object=K?pin-source=file:/p"
    )
    target.add_argument(
        "--auto",
        action="store_true",
        help="choose the key store: the config's key, $DEVICE_SDK_KEY_URI, a TPM, then SoftHSM "
        "(only with --allow-software-key)",
    )
    target.add_argument("--batch", metavar="MANIFEST", type=Path, help="CSV manifest of devices")
    parser.add_argument("--verifier", metavar="URL", help="verifier base URL (its issuer URL)")
    parser.add_argument(
        "--enrollment-token-file",
        metavar="FILE",
        type=Path,
        help="file (mode 0600) holding the one-time enrollment token",
    )
    parser.add_argument("--config", metavar="PATH", type=Path, help="device config file to write")
    parser.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default=DEFAULT_ALGORITHM,
        help=f"algorithm of a new key (default: {DEFAULT_ALGORITHM})",
    )
    parser.add_argument(
        "--allow-software-key",
        action="store_true",
        help="accept a SoftHSM key (development and tests); recorded as hardware_backed=false",
    )
    parser.add_argument(
        "--ca-bundle", metavar="FILE", type=Path, help="CA bundle for TLS to the verifier"
    )
    parser.add_argument("--broker", metavar="URL", help="MQTT broker URL to put in the config")
    parser.add_argument(
        "--report",
        metavar="PATH",
        type=Path,
        help="with --batch: JSON report file (default: MANIFEST.report.json)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.batch is not None:
        return _run_batch(args)

    missing = [
        option
        for option, value in (("--verifier", args.verifier), ("--config", args.config))
        if not value
    ]
    if missing:
        raise ConfigError(f"provision needs {' and '.join(missing)}")

    notes: list[str] = []
    if args.auto:
        choice = choose_key(args.config, allow_software_key=args.allow_software_key)
        key_uri = choice.uri
        notes.append(f"--auto chose {choice.uri} from {choice.source}")
        for name, value in choice.environment.items():
            notes.append(f"to use this key later, export {name}={value}")
    else:
        key_uri = args.key

    request = ProvisioningRequest(
        key_uri=key_uri,
        config_path=args.config,
        verifier_url=args.verifier,
        enrollment_token_file=args.enrollment_token_file,
        algorithm=args.algorithm,
        allow_software_key=args.allow_software_key,
        broker_url=args.broker,
        ca_bundle=args.ca_bundle,
    )
    on_step = None if args.json else _print_step
    result = provision(request, on_step=on_step)
    result.messages.extend(notes)

    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_result(result)
    return 0


def _print_step(outcome: StepOutcome) -> None:
    detail = f"  {outcome.detail}" if outcome.detail else ""
    print(f"  {outcome.step:<12} {outcome.status:<9} {outcome.seconds * 1000:7.1f} ms{detail}")


def _print_result(result: ProvisioningResult) -> None:
    for message in result.messages:
        print(f"note: {message}")
    kind = "hardware" if result.hardware_backed else "software (not hardware-backed)"
    print(f"provisioned device {result.device_id}")
    print(f"  key:         {result.key_uri} ({result.backend}, {kind})")
    print(f"  config:      {result.config_path}")
    print(f"  certificate: {result.certificate_location or 'none issued'}")
    if result.reused_key:
        print("  the token already held this key; it was reused, not replaced")


# --- batch ------------------------------------------------------------------------------------


def _row_request(row: ManifestRow, args: argparse.Namespace) -> ProvisioningRequest:
    key_uri = row.key
    if key_uri.partition(":")[0].lower() not in ("pkcs11", "tpm2", "serial"):
        # A bare token label: the key labelled device-key on that PKCS#11 token.
        if row.pin_file is None:
            raise ConfigError(
                f"manifest line {row.line}: key {row.key!r} is a token label, which needs a "
                "pin_file column value"
            )
        from device_sdk.keys.uri import Pkcs11URI

        key_uri = str(
            Pkcs11URI(
                token=row.key,
                object=KEY_LABEL,
                type="private",
                pin_source=f"file:{row.pin_file}",
            )
        )
    verifier = row.verifier or args.verifier
    if not verifier:
        raise ConfigError(
            f"manifest line {row.line}: no verifier URL; add a verifier column or --verifier"
        )
    allow = row.allow_software_key
    return ProvisioningRequest(
        key_uri=key_uri,
        config_path=row.config,
        verifier_url=verifier,
        enrollment_token_file=row.enrollment_token_file,
        algorithm=row.algorithm or args.algorithm,
        allow_software_key=args.allow_software_key if allow is None else allow,
        broker_url=row.broker or args.broker,
        ca_bundle=row.ca_bundle or args.ca_bundle,
    )


class _Progress:
    """A progress bar on a terminal, one plain line per row elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.counts = {"provisioned": 0, "skipped": 0, "failed": 0}

    def __call__(self, done: int, total: int, result: RowResult) -> None:
        self.counts[result.status] += 1
        if self.tty:
            filled = BAR_WIDTH * done // max(total, 1)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            self.stream.write(
                f"\r[{bar}] {done}/{total}  ok {self.counts['provisioned']}  "
                f"skipped {self.counts['skipped']}  failed {self.counts['failed']}"
            )
            if result.status == STATUS_FAILED:
                self.stream.write(f"\n  row {result.row} ({result.key}): {result.error}\n")
            if done == total:
                self.stream.write("\n")
        else:
            line = f"row {done}/{total} {result.key}: {result.status}"
            if result.device_id:
                line += f" device {result.device_id}"
            if result.error:
                line += f": {result.error}"
            self.stream.write(line + f" ({result.seconds:.2f} s)\n")
        self.stream.flush()


def _run_batch(args: argparse.Namespace) -> int:
    manifest: Path = args.batch
    rows = read_manifest(manifest)
    report_path = args.report or manifest.with_name(manifest.name + ".report.json")

    def provision_row(row: ManifestRow) -> RowOutcome:
        result = provision(_row_request(row, args))
        return RowOutcome(device_id=result.device_id, reused_key=result.reused_key)

    report = run_batch(
        rows, provision_row, manifest=str(manifest), on_row_done=_Progress(sys.stderr)
    )
    write_report(report_path, report)

    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        summary = report.summary
        print(
            f"{summary['total']} rows: {summary['provisioned']} provisioned, "
            f"{summary['skipped']} already done, {summary['failed']} failed; "
            f"report: {report_path}"
        )
    return 0 if report.ok else 1
