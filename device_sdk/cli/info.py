"""``device-sdk info``: the identity a device config names, and whether its servers respond."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from device_sdk.provisioning.info import DeviceInfo, Reachability, device_info


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show the device identity and check the verifier and broker",
        description=(
            "Show the device_id, key backend, whether the key is hardware-backed and the "
            "certificate expiry from a device config, and check that the verifier and the MQTT "
            "broker can be reached. Exit status 1 when a check fails."
        ),
    )
    parser.add_argument("--config", required=True, type=Path, metavar="PATH", help="device config")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    info = device_info(args.config)
    if args.json:
        json.dump(info.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_text(info)
    return 0 if info.ok else 1


def _reachability(check: Reachability | None) -> str:
    if check is None:
        return "not configured"
    if not check.reachable:
        return f"{check.url}: UNREACHABLE ({check.detail})"
    assert check.seconds is not None
    return f"{check.url}: reachable, {check.detail}, {check.seconds * 1000:.0f} ms"


def _print_text(info: DeviceInfo) -> None:
    certificate = info.certificate
    if certificate.not_after is not None:
        cert_text = (
            f"expires {certificate.not_after} ({certificate.days_left} days), "
            f"in {certificate.location}"
        )
    elif certificate.error:
        cert_text = certificate.error
    else:
        cert_text = "none"
    hardware = "yes" if info.hardware_backed else "NO (software key, development only)"
    print(f"device_id:       {info.device_id}")
    print(f"backend:         {info.backend}")
    print(f"hardware_backed: {hardware}")
    print(f"algorithm:       {info.algorithm}")
    print(f"key:             {info.key_uri}")
    print(f"certificate:     {cert_text}")
    print(f"verifier:        {_reachability(info.verifier)}")
    print(f"broker:          {_reachability(info.broker)}")
    for problem in info.problems:
        print(f"problem: {problem}", file=sys.stderr)
